//! From the files of a commit (below `repo_subdir`) to the files to put in
//! K3s's manifests directory.
//!
//! Without a kustomization every `*.yaml`/`*.yml` file below the directory is
//! taken (kustomization files in subdirectories excepted). With a `kustomization.yaml` (or `.yml`, or `Kustomization`) at its
//! root, only what its `resources:` list names is taken: plain files, and
//! directories that have a kustomization of their own (as kustomize
//! requires), followed recursively. Every other kustomization key (patches,
//! generators, `namespace`, remote bases, `helmCharts`...) is refused with an
//! error naming the file and the key: the agent does not render kustomize
//! transformations (no maintained Rust implementation exists); let Argo CD do
//! that from an Application the bootstrap layer applies.
//!
//! A file's name in the manifests directory is `<prefix>-<its path below
//! repo_subdir with '/' replaced by '-'>`, e.g. `apps/argocd.yaml` ->
//! `gitops-apps-argocd.yaml`; two paths that flatten to the same name are an
//! error rather than a silent overwrite.

use std::collections::{BTreeMap, BTreeSet};

const KUSTOMIZATION_NAMES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];
/// Keys a kustomization may have here; anything else is refused.
const ALLOWED_KEYS: [&str; 3] = ["apiVersion", "kind", "resources"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("{file}: cannot parse the kustomization: {reason}")]
    Kustomization { file: String, reason: String },
    #[error("{file}: key `{key}` is not supported (only `resources:` with plain files and directories; see the README's GitOps section)")]
    UnsupportedKey { file: String, key: String },
    #[error("{file}: resource {resource:?}: {reason}")]
    Resource {
        file: String,
        resource: String,
        reason: String,
    },
    #[error("{first} and {second} both become {name} in the manifests directory; rename one")]
    Collision {
        first: String,
        second: String,
        name: String,
    },
    #[error("{path}: {reason}")]
    BadName { path: String, reason: String },
}

/// One file to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Its path below `repo_subdir`.
    pub source: String,
    pub content: Vec<u8>,
}

pub fn is_manifest_file(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}

/// `apps/argocd.yaml` -> `<prefix>-apps-argocd.yaml`.
pub fn flatten(prefix: &str, path: &str) -> Result<String, RenderError> {
    let bad = |reason: &str| RenderError::BadName {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    if path.is_empty() || path.starts_with('/') || path.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
        return Err(bad("not a plain relative path"));
    }
    if !path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
    {
        return Err(bad(
            "only ASCII letters, digits, '.', '-' and '_' are allowed in manifest paths",
        ));
    }
    Ok(format!("{prefix}-{}", path.replace('/', "-")))
}

/// The files of one commit below `repo_subdir` -> file name in the manifests
/// directory -> what to write there.
pub fn render(files: &BTreeMap<String, Vec<u8>>, prefix: &str) -> Result<BTreeMap<String, Manifest>, RenderError> {
    let sources: Vec<String> = match kustomization_in(files, "") {
        Some(file) => {
            let mut seen = BTreeSet::new();
            let mut out = Vec::new();
            follow(files, &file, &mut seen, &mut out)?;
            out
        }
        // A kustomization below the root is not one K3s could apply.
        None => files
            .keys()
            .filter(|p| is_manifest_file(p) && !KUSTOMIZATION_NAMES.contains(&p.rsplit('/').next().unwrap_or(p)))
            .cloned()
            .collect(),
    };
    let mut rendered: BTreeMap<String, Manifest> = BTreeMap::new();
    for source in sources {
        let name = flatten(prefix, &source)?;
        if let Some(existing) = rendered.get(&name) {
            return Err(RenderError::Collision {
                first: existing.source.clone(),
                second: source,
                name,
            });
        }
        let content = files[&source].clone();
        rendered.insert(name, Manifest { source, content });
    }
    Ok(rendered)
}

fn kustomization_in(files: &BTreeMap<String, Vec<u8>>, dir: &str) -> Option<String> {
    KUSTOMIZATION_NAMES
        .iter()
        .map(|name| join(dir, name))
        .find(|path| files.contains_key(path))
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Follows one kustomization's `resources:` into `out` (paths below the root).
fn follow(
    files: &BTreeMap<String, Vec<u8>>,
    kustomization: &str,
    seen: &mut BTreeSet<String>,
    out: &mut Vec<String>,
) -> Result<(), RenderError> {
    if !seen.insert(kustomization.to_string()) {
        return Err(RenderError::Kustomization {
            file: kustomization.to_string(),
            reason: "included twice (a cycle or a duplicate directory)".into(),
        });
    }
    let resources = parse_kustomization(kustomization, &files[kustomization])?;
    let dir = parent(kustomization);
    for resource in resources {
        let fail = |reason: String| RenderError::Resource {
            file: kustomization.to_string(),
            resource: resource.clone(),
            reason,
        };
        if resource.contains("://") || resource.starts_with("github.com/") || resource.contains("?ref=") {
            return Err(fail("remote bases are not supported".into()));
        }
        let path = normalize(dir, &resource).ok_or_else(|| fail("leaves gitops.repo_subdir".into()))?;
        if files.contains_key(&path) {
            if !is_manifest_file(&path) {
                return Err(fail("only .yaml and .yml files can be applied".into()));
            }
            if out.contains(&path) {
                return Err(fail("listed twice".into()));
            }
            out.push(path);
        } else if let Some(child) = kustomization_in(files, &path) {
            follow(files, &child, seen, out)?;
        } else if files.keys().any(|f| f.starts_with(&format!("{path}/"))) {
            return Err(fail(
                "a directory resource needs a kustomization.yaml of its own".into(),
            ));
        } else {
            return Err(fail("no such file or directory in the commit".into()));
        }
    }
    Ok(())
}

/// `dir` + `rel` with `.` and `..` folded; None if it climbs above the root.
fn normalize(dir: &str, rel: &str) -> Option<String> {
    if rel.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

/// The `resources:` of a kustomization; any key beyond `apiVersion`, `kind`
/// and `resources` is refused.
pub fn parse_kustomization(file: &str, bytes: &[u8]) -> Result<Vec<String>, RenderError> {
    let parse_error = |reason: String| RenderError::Kustomization {
        file: file.to_string(),
        reason,
    };
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_slice(bytes).map_err(|e| parse_error(e.to_string()))?;
    let mapping = match value {
        serde_yaml_ng::Value::Mapping(mapping) => mapping,
        serde_yaml_ng::Value::Null => return Ok(Vec::new()),
        _ => return Err(parse_error("the document is not a mapping".into())),
    };
    let mut resources = Vec::new();
    for (key, value) in mapping {
        let key = key
            .as_str()
            .ok_or_else(|| parse_error("a key is not a string".into()))?
            .to_string();
        if !ALLOWED_KEYS.contains(&key.as_str()) {
            return Err(RenderError::UnsupportedKey {
                file: file.to_string(),
                key,
            });
        }
        if key == "resources" {
            let items = match value {
                serde_yaml_ng::Value::Sequence(items) => items,
                serde_yaml_ng::Value::Null => Vec::new(),
                _ => return Err(parse_error("`resources` is not a list".into())),
            };
            for item in items {
                match item {
                    serde_yaml_ng::Value::String(text) => resources.push(text),
                    _ => return Err(parse_error("an entry of `resources` is not a string".into())),
                }
            }
        }
    }
    Ok(resources)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(path, text)| (path.to_string(), text.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn flattens_paths_and_refuses_odd_ones() {
        assert_eq!(flatten("gitops", "a.yaml").unwrap(), "gitops-a.yaml");
        assert_eq!(
            flatten("gitops", "apps/argo-cd/app.yml").unwrap(),
            "gitops-apps-argo-cd-app.yml"
        );
        assert!(flatten("gitops", "../a.yaml").is_err());
        assert!(flatten("gitops", "a b.yaml").is_err());
        assert!(flatten("gitops", "a//b.yaml").is_err());
    }

    #[test]
    fn plain_directories_take_yaml_files_only() {
        let out = render(
            &files(&[
                ("a.yaml", "a"),
                ("sub/b.yml", "b"),
                ("README.md", "x"),
                ("c.json", "{}"),
                ("sub/kustomization.yaml", "resources: []"),
            ]),
            "gitops",
        )
        .unwrap();
        let names: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(names, ["gitops-a.yaml", "gitops-sub-b.yml"]);
        assert_eq!(out["gitops-sub-b.yml"].source, "sub/b.yml");
    }

    #[test]
    fn collisions_are_errors() {
        let err = render(&files(&[("a/b-c.yaml", "1"), ("a-b/c.yaml", "2")]), "g").unwrap_err();
        assert!(matches!(err, RenderError::Collision { .. }), "{err}");
    }

    #[test]
    fn kustomization_resources_are_followed() {
        let out = render(
            &files(&[
                (
                    "kustomization.yaml",
                    "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ns.yaml\n  - ./apps\n",
                ),
                ("ns.yaml", "ns"),
                ("unlisted.yaml", "no"),
                ("apps/kustomization.yml", "resources: [root.yaml, ../ns2.yaml]\n"),
                ("apps/root.yaml", "root"),
                ("ns2.yaml", "ns2"),
            ]),
            "gitops",
        )
        .unwrap();
        let names: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(names, ["gitops-apps-root.yaml", "gitops-ns.yaml", "gitops-ns2.yaml"]);
    }

    #[test]
    fn kustomization_refuses_what_it_cannot_render() {
        let err = |text: &str, extra: &[(&str, &str)]| {
            let mut all = vec![("kustomization.yaml", text)];
            all.extend_from_slice(extra);
            render(&files(&all), "g").unwrap_err().to_string()
        };
        let message = err("resources: [a.yaml]\npatches:\n  - path: p.yaml\n", &[("a.yaml", "a")]);
        assert!(
            message.contains("kustomization.yaml") && message.contains("`patches`"),
            "{message}"
        );
        assert!(err("namespace: x\n", &[]).contains("`namespace`"));
        assert!(err("helmCharts: []\n", &[]).contains("`helmCharts`"));
        assert!(err("resources: [https://github.com/x/y//base?ref=v1]\n", &[]).contains("remote"));
        assert!(err("resources: [../up.yaml]\n", &[]).contains("leaves"));
        assert!(err("resources: [missing.yaml]\n", &[]).contains("no such file"));
        assert!(err("resources: [dir]\n", &[("dir/x.yaml", "x")]).contains("kustomization.yaml of its own"));
        assert!(err("resources: [\n", &[]).contains("cannot parse"));
    }
}
