//! The documentation stays true to the repository: every configuration key is on both the
//! configuration page and in the packaged config, and every relative link leads to a file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `section.key` for every key of a TOML file written as `packaging/config.toml` is: keys set,
/// and optional keys shown commented out (`# key = …`).
fn keys_in_config_toml(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let code = line.strip_prefix('#').map_or(line, str::trim_start);
        let Some((key, _)) = code.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !section.is_empty()
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            keys.insert(format!("{section}.{key}"));
        }
    }
    keys
}

/// The keys the configuration page's table lists: each row's first cell, in backticks.
fn keys_in_configuration_page(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(key, _)| key.to_string())
        .collect()
}

#[test]
fn the_configuration_page_and_the_packaged_config_list_the_same_keys() {
    let toml = std::fs::read_to_string(repo().join("packaging/config.toml")).unwrap();
    let page = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    let in_toml = keys_in_config_toml(&toml);
    let in_page = keys_in_configuration_page(&page);
    assert!(in_toml.len() > 50, "{in_toml:?}");
    let only_toml: Vec<_> = in_toml.difference(&in_page).collect();
    let only_page: Vec<_> = in_page.difference(&in_toml).collect();
    assert!(
        only_toml.is_empty() && only_page.is_empty(),
        "packaging/config.toml only: {only_toml:?}; docs/configuration.md only: {only_page:?}"
    );
}

#[test]
fn the_key_readers_see_nested_sections_and_commented_optional_keys() {
    let toml = "[a]\nx = 1\n# y = \"opt\"   # why\n[a.b]\nz = true\n# a comment, not a key\n";
    let keys: Vec<_> = keys_in_config_toml(toml).into_iter().collect();
    assert_eq!(keys, ["a.b.z", "a.x", "a.y"]);
    let page = "| key | default |\n|---|---|\n| `a.x` | `1` |\n| `a.b.z` | on |\n";
    let keys: Vec<_> = keys_in_configuration_page(page).into_iter().collect();
    assert_eq!(keys, ["a.b.z", "a.x"]);
}

/// Targets of the Markdown links `[text](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("](") {
        rest = &rest[start + 2..];
        if let Some(end) = rest.find(')') {
            targets.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    targets
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md"), repo().join("ARCHITECTURE.md")];
    let docs = std::fs::read_dir(repo().join("docs")).expect("docs/");
    files.extend(
        docs.filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "md")),
    );
    files.sort();
    files
}

#[test]
fn every_relative_link_in_the_docs_points_at_a_file_that_exists() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap_or(Path::new("."));
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let path = target.split('#').next().unwrap_or_default();
            checked += 1;
            if !dir.join(path).exists() {
                broken.push(format!("{}: {target}", file.display()));
            }
        }
    }
    assert!(checked >= 20, "only {checked} relative links found");
    assert!(broken.is_empty(), "links to nothing: {broken:#?}");
}

#[test]
fn the_link_reader_finds_every_target() {
    let targets = link_targets("see [a](docs/a.md) and [b](../b.md#part), [web](https://x.y)");
    assert_eq!(targets, ["docs/a.md", "../b.md#part", "https://x.y"]);
}

#[test]
fn the_readme_stays_a_five_minute_read() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 210,
        "README.md has {lines} lines: move reference into docs/"
    );
}
