//! The config's contract: defaults, layers, and every validation naming its key.

use super::*;
use figment::Jail;
use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn defaults_are_valid() {
    assert!(Config::default().validate().is_ok());
}

/// packaging/config.toml documents every key with its default; keep it true.
#[test]
fn the_shipped_example_config_loads_and_states_the_defaults() {
    Jail::expect_with(|jail| {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/config.toml");
        let config = Config::load(Some(Path::new(example)), &Overrides::default())
            .map_err(|e| e.to_string())?;
        let defaults = Config::default();
        assert_eq!(format!("{config:?}"), format!("{defaults:?}"));
        let _ = jail;
        Ok(())
    });
}

#[test]
fn a_server_list_is_a_comma_separated_string_or_a_toml_array() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "ALARM_DIGEST_NATS__URL",
            "nats://127.0.0.1:4222, nats://127.0.0.1:4223,127.0.0.1:4224",
        );
        let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
        let servers = config.nats.servers().map_err(|e| e.to_string())?;
        assert_eq!(servers.len(), 3);
        assert_eq!(servers[2].port(), 4224);
        jail.clear_env();
        jail.create_file(
            "c.toml",
            "[nats]\nurl = [\"nats://a:4222\", \"tls://b:4443\"]\n",
        )?;
        let config = Config::load(Some(Path::new("c.toml")), &Overrides::default())
            .map_err(|e| e.to_string())?;
        assert_eq!(config.nats.url, "nats://a:4222,tls://b:4443");
        assert_eq!(config.nats.servers().map_err(|e| e.to_string())?.len(), 2);
        Ok(())
    });
}

#[test]
fn a_server_list_that_does_not_parse_names_the_key() {
    for bad in [
        "nats://127.0.0.1:4222,nats://127.0.0.1:port",
        "http://127.0.0.1:4222",
        " , ",
    ] {
        let mut config = Config::default();
        config.nats.url = bad.into();
        let error = config.validate().expect_err(bad).to_string();
        assert!(error.starts_with("config key `nats.url`"), "{bad}: {error}");
    }
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[nats]\nurl = \"nats://file:4222\"\n[shards]\ncount = 8\n",
        )?;
        jail.set_env("ALARM_DIGEST_NATS__URL", "nats://env:4222");
        jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "[0,2]");
        let config = Config::load(Some(Path::new("c.toml")), &Overrides::default())
            .map_err(|e| e.to_string())?;
        assert_eq!(config.nats.url, "nats://env:4222");
        assert_eq!(config.shards.count, 8);
        assert_eq!(
            config.shards.owned,
            OwnedShards::List(BTreeSet::from([0, 2]))
        );
        let flags = Overrides {
            nats_url: Some("nats://flag:4222".into()),
            ..Overrides::default()
        };
        let config = Config::load(Some(Path::new("c.toml")), &flags).map_err(|e| e.to_string())?;
        assert_eq!(config.nats.url, "nats://flag:4222");
        Ok(())
    });
}

#[test]
fn owned_accepts_all_and_lists_in_every_spelling() {
    for (text, expected) in [
        ("all", OwnedShards::All),
        ("[0, 2]", OwnedShards::List(BTreeSet::from([0, 2]))),
        ("1,3", OwnedShards::List(BTreeSet::from([1, 3]))),
        ("ordinal", OwnedShards::Ordinal),
    ] {
        assert_eq!(OwnedShards::parse(text), Ok(expected));
    }
    assert!(OwnedShards::parse("[0,x]").is_err());
}

#[test]
fn ordinal_ownership_takes_the_statefulset_hostname_suffix() {
    Jail::expect_with(|jail| {
        jail.set_env("ALARM_DIGEST_SHARDS__COUNT", "6");
        jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "ordinal");
        jail.set_env("ALARM_DIGEST_SHARDS__REPLICAS", "3");
        jail.set_env("HOSTNAME", "alarm-digest-1");
        let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
        assert_eq!(config.shards.ordinal, Some(1));
        assert_eq!(config.shards.owned_shards(), vec![1, 4]);

        // An explicit ordinal wins over the hostname.
        jail.set_env("ALARM_DIGEST_SHARDS__ORDINAL", "2");
        let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
        assert_eq!(config.shards.owned_shards(), vec![2, 5]);

        jail.set_env("ALARM_DIGEST_SHARDS__ORDINAL", "3");
        let error = Config::load(None, &Overrides::default()).expect_err("ordinal too big");
        assert!(error.to_string().contains("shards.ordinal"), "{error}");
        assert!(error.to_string().contains("0 to 2"), "{error}");
        Ok(())
    });
}

#[test]
fn ordinal_ownership_without_a_numbered_hostname_says_what_to_set() {
    Jail::expect_with(|jail| {
        jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "ordinal");
        jail.set_env("ALARM_DIGEST_SHARDS__REPLICAS", "2");
        jail.set_env("HOSTNAME", "db-primary");
        let error = Config::load(None, &Overrides::default()).expect_err("no ordinal");
        let text = error.to_string();
        assert!(text.contains("db-primary"), "{text}");
        assert!(text.contains("ALARM_DIGEST_SHARDS__ORDINAL"), "{text}");
        Ok(())
    });
}

#[test]
fn every_shard_has_exactly_one_ordinal_owner() {
    let mut shards = ShardsConfig {
        count: 16,
        owned: OwnedShards::Ordinal,
        replicas: 3,
        ..ShardsConfig::default()
    };
    let mut owners = vec![0; 16];
    for ordinal in 0..3 {
        shards.ordinal = Some(ordinal);
        for shard in shards.owned_shards() {
            owners[usize::from(shard)] += 1;
        }
    }
    assert_eq!(owners, vec![1; 16]);
}

#[test]
fn with_standbys_every_shard_has_one_primary_and_that_many_standbys() {
    let mut shards = ShardsConfig {
        count: 12,
        owned: OwnedShards::Ordinal,
        replicas: 3,
        standbys: 1,
        ..ShardsConfig::default()
    };
    let mut owners = vec![0; 12];
    let mut primaries = vec![0; 12];
    for ordinal in 0..3 {
        shards.ordinal = Some(ordinal);
        let owned = shards.owned_shards();
        assert_eq!(
            owned.len(),
            8,
            "ordinal {ordinal}: its 4 and its predecessor's 4"
        );
        for shard in owned {
            owners[usize::from(shard)] += 1;
            if shards.is_primary(shard) {
                assert_eq!(shard % 3, ordinal);
                primaries[usize::from(shard)] += 1;
            }
        }
    }
    assert_eq!(owners, vec![2; 12]);
    assert_eq!(primaries, vec![1; 12]);
}

#[test]
fn standbys_need_ordinal_ownership_and_fewer_than_the_replicas() {
    Jail::expect_with(|jail| {
        jail.set_env("ALARM_DIGEST_SHARDS__STANDBYS", "1");
        let error = Config::load(None, &Overrides::default()).expect_err("not ordinal");
        assert!(error.to_string().contains("shards.standbys"), "{error}");
        jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "ordinal");
        jail.set_env("ALARM_DIGEST_SHARDS__ORDINAL", "0");
        jail.set_env("ALARM_DIGEST_SHARDS__REPLICAS", "2");
        assert_eq!(
            Config::load(None, &Overrides::default())
                .expect("one standby of two")
                .shards
                .owned_shards()
                .len(),
            16
        );
        jail.set_env("ALARM_DIGEST_SHARDS__STANDBYS", "2");
        let error = Config::load(None, &Overrides::default()).expect_err("too many");
        assert!(
            error.to_string().contains("below shards.replicas"),
            "{error}"
        );
        Ok(())
    });
}

#[test]
fn bad_values_name_the_key() {
    Jail::expect_with(|jail| {
        jail.set_env("ALARM_DIGEST_SHARDS__COUNT", "4");
        jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "[7]");
        let error = Config::load(None, &Overrides::default()).expect_err("invalid");
        assert!(error.to_string().contains("shards.owned"), "{error}");
        jail.set_env("ALARM_DIGEST_SHARDS__OWNED", "all");
        jail.set_env("ALARM_DIGEST_SHARDS__COUNT", "lots");
        let error = Config::load(None, &Overrides::default()).expect_err("invalid");
        assert!(error.to_string().contains("shards.count"), "{error}");
        Ok(())
    });
}

#[test]
fn unknown_keys_are_refused_rather_than_ignored() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[shards]\ncuont = 8\n")?;
        let error =
            Config::load(Some(Path::new("c.toml")), &Overrides::default()).expect_err("typo");
        assert!(error.to_string().contains("cuont"), "{error}");
        Ok(())
    });
}

#[test]
fn a_world_readable_file_with_a_secret_is_flagged_and_a_private_one_is_not() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[nats]\nuser = \"svc\"\npassword = \"x\"\n").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_eq!(
        Config::world_readable_secret_file(Some(&path)),
        Some(path.clone())
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(Config::world_readable_secret_file(Some(&path)), None);
    std::fs::write(&path, "[nats]\nurl = \"nats://x:4222\"\n").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_eq!(
        Config::world_readable_secret_file(Some(&path)),
        None,
        "no secret in it"
    );
}

#[test]
fn secrets_never_show_in_debug_output() {
    let mut config = Config::default();
    config.nats.user = Some("svc".into());
    config.nats.password = Some(Secret("hunter2".into()));
    assert!(!format!("{config:?}").contains("hunter2"));
}
