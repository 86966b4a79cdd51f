//! The service against nats-servers that require authentication or TLS.

use std::path::Path;
use std::time::Duration;

use async_nats::ConnectOptions;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tempfile::tempdir;

use alarm_digest::config::{Config, Secret};

use crate::support::*;

/// Starts an instance with `config`, then checks one status change → digest round trip
/// through a producer connected with `producer`.
/// Also checks that `secret` shows on none of the HTTP pages.
async fn round_trip(config: Config, producer: ConnectOptions, secret: &str) {
    let service = start_service(config.clone()).await;
    let client = TestClient::connect_with(producer, &config).await;
    client
        .status("u", "a", "WARNING", "2021-06-07T20:00:01Z")
        .await;
    client.request_digest("u").await;
    let digest = client.digests().await.next().await;
    assert_eq!(
        entries(&digest),
        [("a".into(), "WARNING".into(), "2021-06-07T20:00:01Z".into())]
    );
    let http = service.http_addr.to_string();
    for path in ["/metrics", "/readyz", "/livez", "/inspect/user?id=u"] {
        let (code, body) = http_get(&http, path).await.expect("http");
        assert_eq!(code, 200, "{path}");
        assert!(!body.contains(secret), "{path} shows the secret");
    }
    service.stop().await.expect("clean stop");
}

fn secret(text: &str) -> Secret {
    serde_json::from_value(serde_json::Value::String(text.into())).expect("a secret")
}

#[tokio::test]
async fn user_and_password() {
    let nats =
        NatsServer::start_with_config(r#"authorization { user: "svc", password: "pa55-w0rd-x" }"#);
    let data = tempdir().expect("data dir");
    let mut config = test_config(&nats, data.path());
    config.nats.user = Some("svc".into());
    config.nats.password = Some(secret("pa55-w0rd-x"));
    let producer = ConnectOptions::new().user_and_password("svc".into(), "pa55-w0rd-x".into());
    round_trip(config, producer, "pa55-w0rd-x").await;
}

#[tokio::test]
async fn token() {
    let nats = NatsServer::start_with_config(r#"authorization { token: "t0ken-value-x" }"#);
    let data = tempdir().expect("data dir");
    let mut config = test_config(&nats, data.path());
    config.nats.token = Some(secret("t0ken-value-x"));
    round_trip(
        config,
        ConnectOptions::new().token("t0ken-value-x".into()),
        "t0ken-value-x",
    )
    .await;
}

#[tokio::test]
async fn nkey() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let nats = NatsServer::start_with_config(&format!(
        r#"authorization {{ users: [ {{ nkey: "{}" }} ] }}"#,
        user.public_key()
    ));
    let data = tempdir().expect("data dir");
    let mut config = test_config(&nats, data.path());
    config.nats.nkey_seed = Some(secret(&seed));
    round_trip(config, ConnectOptions::new().nkey(seed.clone()), &seed).await;
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
fn write_certificates(dir: &Path) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "alarm-digest test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca, ca_key);
    for (name, sans) in [
        (
            "server",
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
        ),
        ("client", vec!["alarm-digest".to_string()]),
    ] {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &issuer).expect("signed");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem())
            .expect("write key");
    }
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca");
}

#[tokio::test]
async fn tls_with_a_private_ca_and_verified_client_certificates() {
    let certs = tempdir().expect("cert dir");
    write_certificates(certs.path());
    let p = |name: &str| certs.path().join(name);
    let nats = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}",
        p("server.pem"),
        p("server-key.pem"),
        p("ca.pem")
    ));
    let data = tempdir().expect("data dir");
    let mut config = test_config(&nats, data.path());
    config.nats.tls.required = true;
    config.nats.tls.ca_file = Some(p("ca.pem"));
    config.nats.tls.cert_file = Some(p("client.pem"));
    config.nats.tls.key_file = Some(p("client-key.pem"));
    let producer = ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(p("ca.pem"))
        .add_client_certificate(p("client.pem"), p("client-key.pem"));
    let client_key = std::fs::read_to_string(p("client-key.pem")).expect("key");
    let key_line = client_key.lines().nth(1).expect("a key line").to_string();
    round_trip(config, producer, &key_line).await;
}

#[test]
fn a_wrong_password_is_retried_and_never_logged() {
    let nats =
        NatsServer::start_with_config(r#"authorization { user: "svc", password: "right-one" }"#);
    let data = tempdir().expect("data dir");
    let mut service = std::process::Command::new(env!("CARGO_BIN_EXE_alarm-digest"))
        .arg("run")
        .env("ALARM_DIGEST_NATS__URL", nats.url())
        .env("ALARM_DIGEST_NATS__USER", "svc")
        .env("ALARM_DIGEST_NATS__PASSWORD", "wr0ng-s3cret-value")
        .env("ALARM_DIGEST_STORAGE__PATH", data.path())
        .env("ALARM_DIGEST_HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_secs(2));
    let _ = service.kill();
    let output = service.wait_with_output().expect("output");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("cannot connect") || log.contains("retrying"),
        "retries, logged: {log:.2000}"
    );
    assert!(
        log.to_lowercase().contains("authorization"),
        "says why: {log:.2000}"
    );
    assert!(
        !log.contains("wr0ng-s3cret-value"),
        "the password leaked into the log"
    );
}

#[tokio::test]
async fn http_serves_only_get_on_its_paths() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    assert!(
        Config::default().http.listen.starts_with("127.0.0.1:"),
        "localhost by default"
    );
    let nats = NatsServer::start();
    let data = tempdir().expect("data dir");
    let service = start_service(test_config(&nats, data.path())).await;
    let http = service.http_addr.to_string();
    let (code, _) = http_get(&http, "/nothing-here").await.expect("http");
    assert_eq!(code, 404);
    for method in ["POST", "PUT", "DELETE"] {
        let mut stream = tokio::net::TcpStream::connect(&http)
            .await
            .expect("connect");
        let request = format!("{method} /livez HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(
            response.split_whitespace().nth(1) == Some("405"),
            "{method}: {response}"
        );
    }
    service.stop().await.expect("clean stop");
}

/// A NATS JWT (v2): `header.claims.signature`, signed by the issuer's NKey.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{:032X}", rand::random::<u128>()),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signing_input = format!("{header}.{}", b64.encode(claims.to_string()));
    let signature = issuer.sign(signing_input.as_bytes()).expect("sign");
    format!("{signing_input}.{}", b64.encode(signature))
}

#[tokio::test]
async fn creds_file_against_an_operator_mode_server() {
    use serde_json::json;
    let (operator, account, user) = (
        nkeys::KeyPair::new_operator(),
        nkeys::KeyPair::new_account(),
        nkeys::KeyPair::new_user(),
    );
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        json!({"type": "operator", "version": 2}),
    );
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "test-account",
        json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "alarm-digest",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    let seed = user.seed().expect("seed");
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2}),
    );

    let dir = tempdir().expect("dir");
    let operator_path = dir.path().join("operator.jwt");
    std::fs::write(&operator_path, &operator_jwt).expect("write operator");
    let creds = dir.path().join("alarm-digest.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .expect("write creds");
    let nats = NatsServer::start_with_config(&format!(
        "operator: {operator_path:?}\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {acc}: {account_jwt:?}, {sys}: {system_jwt:?} }}\n",
        sys = system.public_key(),
        acc = account.public_key(),
    ));
    let data = tempdir().expect("data dir");
    let mut config = test_config(&nats, data.path());
    config.nats.creds_file = Some(creds.clone());
    let producer = ConnectOptions::with_credentials_file(creds)
        .await
        .expect("creds");
    round_trip(config, producer, &seed).await;
}
