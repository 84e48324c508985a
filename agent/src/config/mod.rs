//! Configuration: TOML drop-ins merged by file name, checked file by file
//! (so every error names the file, line and key that caused it), then merged
//! key by key with a record of which file set each key.
//!
//! Order: `/usr/lib/platform-agent/config.d` -> `/etc/platform-agent/config.d`
//! -> `/run/platform-agent/config.d`. A file in a later directory replaces a
//! file of the same name in an earlier one (so `/etc/.../00-default.toml`
//! masks the vendor file); the surviving files are applied in file-name order
//! and a later file overrides single keys of an earlier one. Tables merge key
//! by key; any other value, arrays included, is replaced whole.
//!
//! Keys that name a path (`path`, `socket`, `mount_point`, `device`,
//! `config_dropin`, `*_dir`, `*_file`, `*_path`) may be relative; they are
//! resolved against the directory of the file that set them (inside
//! `[[backup.jobs]]` too).

mod settings;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub(crate) use settings::word_enum;
pub use settings::*;

/// Where the vendor, administrator and runtime drop-ins live, lowest first.
pub const STANDARD_DIRS: [&str; 3] = [
    "/usr/lib/platform-agent/config.d",
    "/etc/platform-agent/config.d",
    "/run/platform-agent/config.d",
];

/// Which files make up the configuration.
#[derive(Debug, Clone)]
pub enum ConfigSources {
    /// The three standard drop-in directories; missing directories are fine.
    Standard,
    /// Files or directories named on the command line, applied in this order;
    /// each must exist.
    Explicit(Vec<PathBuf>),
}

impl ConfigSources {
    pub fn from_args(paths: &[PathBuf]) -> Self {
        if paths.is_empty() {
            ConfigSources::Standard
        } else {
            ConfigSources::Explicit(paths.to_vec())
        }
    }

    /// The files to apply, in order.
    pub fn files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        match self {
            ConfigSources::Standard => files_in_dirs(&STANDARD_DIRS.map(Path::new)),
            ConfigSources::Explicit(paths) => {
                let mut files = Vec::new();
                for path in paths {
                    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?;
                    if meta.is_dir() {
                        files.extend(toml_files_in(path, true)?);
                    } else {
                        files.push(path.clone());
                    }
                }
                Ok(files)
            }
        }
    }
}

/// The drop-ins of several directories, lowest precedence first: a file
/// replaces an earlier one of the same name, and all are ordered by name.
fn files_in_dirs(dirs: &[&Path]) -> Result<Vec<PathBuf>, ConfigError> {
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        for file in toml_files_in(dir, false)? {
            let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            by_name.insert(name, file);
        }
    }
    Ok(by_name.into_values().collect())
}

fn toml_files_in(dir: &Path, must_exist: bool) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if !must_exist && err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "toml") && !path.is_dir() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    BuiltIn,
    File { path: PathBuf, line: usize },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::BuiltIn => f.write_str("built-in default"),
            Origin::File { path, line } => write!(f, "{}:{}", path.display(), line),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {}{message}", path.display(), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        origin: Origin,
        key: String,
        message: String,
    },
}

/// All problems found in one load, so that `config check` can list them at
/// once instead of making the operator fix them one by one.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(err: ConfigError) -> Self {
        ConfigErrors(vec![err])
    }
}

/// A validated configuration and where each of its keys came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub settings: Settings,
    pub files: Vec<PathBuf>,
    provenance: BTreeMap<String, Origin>,
}

/// One line of `config show --effective`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EffectiveEntry {
    pub key: String,
    pub value: String,
    pub source: String,
}

impl LoadedConfig {
    /// Where `key` was set. Keys inside arrays (`volume.directories[1].mode`)
    /// resolve to the array, which is set as a whole.
    pub fn origin(&self, key: &str) -> Origin {
        let mut key = key;
        loop {
            if let Some(origin) = self.provenance.get(key) {
                return origin.clone();
            }
            match key.rfind(['.', '[']) {
                Some(cut) => key = &key[..cut],
                None => return Origin::BuiltIn,
            }
        }
    }

    /// Every leaf key of the effective configuration with the file that set it.
    pub fn effective(&self) -> Vec<EffectiveEntry> {
        let value = toml::Value::try_from(&self.settings).expect("settings always serialize to TOML");
        let mut leaves = Vec::new();
        flatten_value("", &value, &mut leaves);
        leaves
            .into_iter()
            .map(|(key, value)| EffectiveEntry {
                source: self.origin(&key).to_string(),
                key,
                value,
            })
            .collect()
    }
}

fn flatten_value(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
    match value {
        toml::Value::Table(table) => {
            for (key, child) in table {
                flatten_value(&join_key(prefix, key), child, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Reads, checks and merges the configuration.
pub fn load(sources: &ConfigSources) -> Result<LoadedConfig, ConfigErrors> {
    let loaded = load_merged(sources)?;
    validate::validate(&loaded)?;
    Ok(loaded)
}

/// The merged settings, each file checked against the schema, without the
/// checks that look at the machine (groups, secret files): for `wal-push`
/// and `wal-fetch`, which PostgreSQL runs as its own user once per segment.
pub fn load_unchecked(sources: &ConfigSources) -> Result<Settings, ConfigErrors> {
    load_merged(sources).map(|loaded| loaded.settings)
}

fn load_merged(sources: &ConfigSources) -> Result<LoadedConfig, ConfigErrors> {
    let files = sources.files()?;
    let mut errors = Vec::new();
    let mut merged = toml::Table::new();
    let mut provenance = BTreeMap::new();
    for path in &files {
        match parse_file(path) {
            Ok(parsed) => {
                merge_tables(&mut merged, parsed.table);
                provenance.extend(parsed.key_lines.into_iter().map(|(key, line)| {
                    (
                        key,
                        Origin::File {
                            path: path.clone(),
                            line,
                        },
                    )
                }));
            }
            Err(err) => errors.push(err),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let settings: Settings = match toml::Value::Table(merged).try_into() {
        Ok(settings) => settings,
        // Each file was accepted on its own; a failure here would be a bug in
        // the merge, but it still must not take the daemon down half-way.
        Err(err) => {
            return Err(ConfigErrors(vec![ConfigError::Invalid {
                origin: Origin::BuiltIn,
                key: "<merged>".into(),
                message: err.to_string(),
            }]))
        }
    };
    Ok(LoadedConfig {
        settings,
        files,
        provenance,
    })
}

struct ParsedFile {
    table: toml::Table,
    /// Leaf key path -> line it is set on.
    key_lines: Vec<(String, usize)>,
}

fn parse_file(path: &Path) -> Result<ParsedFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_error = |span: Option<Range<usize>>, key: Option<String>, message: String| {
        let (line, column) = span.map(|s| line_column(&text, s.start)).unwrap_or((1, 1));
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            key,
            message,
        }
    };
    let document = toml_edit::ImDocument::parse(text.as_str())
        .map_err(|err| parse_error(err.span(), None, first_line(err.message())))?;
    let mut keys = Vec::new();
    collect_keys("", document.as_table(), &mut keys);

    // Checking the single file against the typed schema catches unknown keys
    // and wrong types while we still know which file they came from.
    if let Err(err) = toml::from_str::<Settings>(&text) {
        let key = err.span().and_then(|span| key_at(&keys, span.start));
        return Err(parse_error(err.span(), key, first_line(err.message())));
    }
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|err| parse_error(err.span(), None, first_line(err.message())))?;
    if let Some(base) = path.parent() {
        resolve_relative_paths(&mut table, base);
    }
    let key_lines = keys
        .into_iter()
        .filter(|k| k.leaf)
        .map(|k| (k.path, line_column(&text, k.key_span.start).0))
        .collect();
    Ok(ParsedFile { table, key_lines })
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

struct KeySpan {
    path: String,
    key_span: Range<usize>,
    value_span: Option<Range<usize>>,
    leaf: bool,
}

fn collect_keys(prefix: &str, table: &toml_edit::Table, out: &mut Vec<KeySpan>) {
    for (name, item) in table.iter() {
        let path = join_key(prefix, name);
        let key_span = table.key(name).and_then(|key| key.span()).unwrap_or(0..0);
        match item {
            toml_edit::Item::Table(child) => {
                out.push(KeySpan {
                    path: path.clone(),
                    key_span,
                    value_span: child.span(),
                    leaf: false,
                });
                collect_keys(&path, child, out);
            }
            toml_edit::Item::Value(toml_edit::Value::InlineTable(inline)) => {
                out.push(KeySpan {
                    path: path.clone(),
                    key_span,
                    value_span: inline.span(),
                    leaf: false,
                });
                collect_keys(&path, &inline.clone().into_table(), out);
            }
            other => out.push(KeySpan {
                path,
                key_span,
                value_span: other.span(),
                leaf: true,
            }),
        }
    }
}

/// The innermost key whose name or value covers the byte offset.
fn key_at(keys: &[KeySpan], offset: usize) -> Option<String> {
    let covers = |span: &Range<usize>| span.start <= offset && offset < span.end.max(span.start + 1);
    keys.iter()
        .filter(|k| covers(&k.key_span) || k.value_span.as_ref().is_some_and(covers))
        .min_by_key(|k| {
            let key_len = k.key_span.len();
            let value_len = k.value_span.as_ref().map_or(usize::MAX, |s| s.len());
            if covers(&k.key_span) {
                key_len
            } else {
                value_len
            }
        })
        .map(|k| k.path.clone())
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

fn merge_tables(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => merge_tables(existing, incoming),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn is_path_key(key: &str) -> bool {
    matches!(key, "path" | "socket" | "mount_point" | "device" | "config_dropin")
        || key.ends_with("_dir")
        || key.ends_with("_file")
        || key.ends_with("_path")
}

fn resolve_relative_paths(table: &mut toml::Table, base: &Path) {
    for (key, value) in table.iter_mut() {
        match value {
            toml::Value::Table(child) => resolve_relative_paths(child, base),
            // Backup jobs and gitops bootstrap secrets are tables in an array; their paths are files on
            // this machine like any other. (`volume.directories[].path` is
            // relative to the mount point on purpose and stays as written.)
            toml::Value::Array(items) if key == "jobs" || key == "bootstrap_secrets" => {
                for item in items {
                    if let toml::Value::Table(child) = item {
                        resolve_relative_paths(child, base);
                    }
                }
            }
            toml::Value::String(text)
                if is_path_key(key) && !text.is_empty() && Path::new(text.as_str()).is_relative() =>
            {
                *text = lexical_join(base, text).to_string_lossy().into_owned();
            }
            _ => {}
        }
    }
}

/// `base.join(rel)` with `.` and `..` folded, so that paths shown to the
/// operator read naturally; symlinks are not resolved (the path need not exist).
fn lexical_join(base: &Path, rel: &str) -> PathBuf {
    use std::path::Component;
    let base = if base.as_os_str().is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
    } else if base.is_relative() {
        std::env::current_dir()
            .map(|cwd| cwd.join(base))
            .unwrap_or_else(|_| base.to_path_buf())
    } else {
        base.to_path_buf()
    };
    let mut out = PathBuf::new();
    for component in base.join(rel).components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests;
