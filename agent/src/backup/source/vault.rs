//! Vault/OpenBao raft snapshots: `GET /v1/sys/storage/raft/snapshot` into a
//! private spool file, checked against the archive's own SHA256SUMS before
//! anything is stored (an empty or truncated snapshot never is), restored
//! with `POST /v1/sys/storage/raft/snapshot-force`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::http::{empty, streaming, HttpClient};
use super::SourceError;
use crate::backup::settings::VaultSource;

pub const FORMAT: &str = "vault-raft-snapshot";
const SNAPSHOT_PATH: &str = "/v1/sys/storage/raft/snapshot";
const RESTORE_PATH: &str = "/v1/sys/storage/raft/snapshot-force";

/// What the check of a snapshot archive found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCheck {
    pub files: Vec<String>,
    pub state_bytes: u64,
    /// Raft index and term from meta.json.
    pub index: u64,
    pub term: u64,
}

impl std::fmt::Display for SnapshotCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "raft snapshot at index {} (term {}), state.bin {} bytes, SHA256SUMS match for {}",
            self.index,
            self.term,
            self.state_bytes,
            self.files.join(", ")
        )
    }
}

fn read_secret(path: &Path) -> Result<String, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|e| SourceError::io(format!("read {}", path.display()), e))?;
    Ok(text.trim().to_string())
}

/// A token: from `token_file`, or by AppRole login.
pub async fn token(client: &HttpClient, settings: &VaultSource) -> Result<String, SourceError> {
    if !settings.token_file.as_os_str().is_empty() {
        return read_secret(&settings.token_file);
    }
    let role_id = read_secret(&settings.approle_role_id_file)?;
    let secret_id = read_secret(&settings.approle_secret_id_file)?;
    let path = format!("/v1/auth/{}/login", settings.approle_mount.trim_matches('/'));
    let (status, body) = client
        .json(
            hyper::Method::POST,
            &path,
            None,
            Some(serde_json::json!({ "role_id": role_id, "secret_id": secret_id })),
        )
        .await?;
    if status != 200 {
        return Err(SourceError::Http {
            url: client.url(&path),
            message: format!("AppRole login answered HTTP {status}: {}", vault_errors(&body)),
        });
    }
    body["auth"]["client_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| SourceError::Http {
            url: client.url(&path),
            message: "AppRole login answer has no auth.client_token".into(),
        })
}

fn vault_errors(body: &serde_json::Value) -> String {
    match body["errors"].as_array() {
        Some(errors) => errors.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>().join("; "),
        None => body.to_string(),
    }
}

/// Downloads a snapshot into `path` (created 0600); returns its size.
pub async fn download(settings: &VaultSource, path: &Path, cancel: &CancellationToken) -> Result<u64, SourceError> {
    let client = HttpClient::new(&settings.address, &settings.ca_file)?;
    let token = token(&client, settings).await?;
    let url = client.url(SNAPSHOT_PATH);
    let response = client
        .send(hyper::Method::GET, SNAPSHOT_PATH, &[("x-vault-token", &token)], empty())
        .await?;
    let status = response.status().as_u16();
    if status != 200 {
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        return Err(SourceError::Http {
            url,
            message: format!("HTTP {status}: {}", vault_errors(&json)),
        });
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(|e| SourceError::io(format!("create {}", path.display()), e))?;
    let mut body = response.into_body();
    let mut size = 0u64;
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return Err(SourceError::Cancelled),
            frame = body.frame() => frame,
        };
        match frame {
            None => break,
            Some(Err(err)) => {
                return Err(SourceError::Http {
                    url,
                    message: format!("the snapshot stream broke after {size} bytes: {err}"),
                })
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    file.write_all(&data)
                        .await
                        .map_err(|e| SourceError::io(format!("write {}", path.display()), e))?;
                    size += data.len() as u64;
                }
            }
        }
    }
    file.sync_all()
        .await
        .map_err(|e| SourceError::io(format!("fsync {}", path.display()), e))?;
    Ok(size)
}

/// Checks a snapshot archive (gzip tar of meta.json, state.bin, SHA256SUMS):
/// it must be complete, every file listed in SHA256SUMS must be there with
/// that SHA-256, and state.bin must not be empty.
pub fn check(input: &mut dyn Read) -> Result<SnapshotCheck, SourceError> {
    let invalid = |why: String| SourceError::Invalid(format!("Vault snapshot rejected: {why}"));
    let mut counted = CountingReader { inner: input, bytes: 0 };
    let mut sums: BTreeMap<String, String> = BTreeMap::new();
    let mut listed: Option<String> = None;
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    let mut meta = serde_json::Value::Null;
    {
        let gz = flate2::read::GzDecoder::new(&mut counted);
        let mut archive = tar::Archive::new(gz);
        let entries = archive
            .entries()
            .map_err(|e| invalid(format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| invalid(format!("the archive is damaged or truncated: {e}")))?;
            let name = entry
                .path()
                .map_err(|e| invalid(format!("bad member name: {e}")))?
                .to_string_lossy()
                .into_owned();
            let mut hasher = Sha256::new();
            let mut content = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut size = 0u64;
            loop {
                let n = entry
                    .read(&mut buf)
                    .map_err(|e| invalid(format!("{name} is truncated: {e}")))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                size += n as u64;
                if name == "SHA256SUMS" || name == "meta.json" {
                    content.extend_from_slice(&buf[..n]);
                }
            }
            if name == "SHA256SUMS" {
                listed = Some(String::from_utf8_lossy(&content).into_owned());
            } else if name == "meta.json" {
                meta = serde_json::from_slice(&content).unwrap_or(serde_json::Value::Null);
            }
            sums.insert(name.clone(), hex::encode(hasher.finalize()));
            sizes.insert(name, size);
        }
        // The gzip trailer (CRC and length) is checked only once the stream
        // is read to its end.
        let mut rest = archive.into_inner();
        std::io::copy(&mut rest, &mut std::io::sink())
            .map_err(|e| invalid(format!("the archive is damaged or truncated: {e}")))?;
    }
    if counted.bytes == 0 {
        return Err(invalid("the snapshot is empty".into()));
    }
    let listed = listed.ok_or_else(|| invalid("no SHA256SUMS in the archive".into()))?;
    let mut checked = Vec::new();
    for line in listed.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let (Some(expected), Some(name)) = (parts.next(), parts.next()) else {
            return Err(invalid(format!("malformed SHA256SUMS line {line:?}")));
        };
        let name = name.trim_start_matches('*');
        match sums.get(name) {
            None => return Err(invalid(format!("{name} is listed in SHA256SUMS but missing"))),
            Some(actual) if actual != expected => {
                return Err(invalid(format!(
                    "{name}: SHA-256 {actual} does not match SHA256SUMS ({expected})"
                )))
            }
            Some(_) => checked.push(name.to_string()),
        }
    }
    for required in ["meta.json", "state.bin"] {
        if !checked.iter().any(|c| c == required) {
            return Err(invalid(format!("{required} is not covered by SHA256SUMS")));
        }
    }
    let state_bytes = sizes.get("state.bin").copied().unwrap_or(0);
    if state_bytes == 0 {
        return Err(invalid("state.bin is empty".into()));
    }
    Ok(SnapshotCheck {
        files: checked,
        state_bytes,
        index: meta["Index"].as_u64().unwrap_or(0),
        term: meta["Term"].as_u64().unwrap_or(0),
    })
}

struct CountingReader<'a> {
    inner: &'a mut dyn Read,
    bytes: u64,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Replaces Vault's data with the snapshot in `path` (checked first).
pub async fn restore(settings: &VaultSource, path: &Path) -> Result<SnapshotCheck, SourceError> {
    let checked = {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut file =
                std::fs::File::open(&path).map_err(|e| SourceError::io(format!("open {}", path.display()), e))?;
            check(&mut file)
        })
        .await
        .map_err(|e| SourceError::Invalid(format!("check task failed: {e}")))??
    };
    let client = HttpClient::new(&settings.address, &settings.ca_file)?;
    let token = token(&client, settings).await?;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| SourceError::io(format!("open {}", path.display()), e))?;
    let size = file
        .metadata()
        .await
        .map_err(|e| SourceError::io(format!("stat {}", path.display()), e))?
        .len()
        .to_string();
    let response = client
        .send(
            hyper::Method::POST,
            RESTORE_PATH,
            &[
                ("x-vault-token", &token),
                ("content-type", "application/octet-stream"),
                ("content-length", &size),
            ],
            streaming(file),
        )
        .await?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if !(200..300).contains(&status) {
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        return Err(SourceError::Http {
            url: client.url(RESTORE_PATH),
            message: format!("HTTP {status}: {}", vault_errors(&json)),
        });
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(state: &[u8], tamper: bool) -> Vec<u8> {
        let meta = br#"{"ID":"1-2","Index":42,"Term":3}"#;
        let sum = |data: &[u8]| hex::encode(Sha256::digest(data));
        let mut sums = format!("{}  meta.json\n{}  state.bin\n", sum(meta), sum(state));
        if tamper {
            sums = sums.replacen(&sum(state)[..4], "0000", 1);
        }
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, data) in [
            ("meta.json", &meta[..]),
            ("state.bin", state),
            ("SHA256SUMS", sums.as_bytes()),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            builder.append_data(&mut header, name, data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn a_good_snapshot_passes() {
        let data = snapshot(&[7u8; 100_000], false);
        let checked = check(&mut &data[..]).unwrap();
        assert_eq!(checked.index, 42);
        assert_eq!(checked.state_bytes, 100_000);
        assert_eq!(checked.files, vec!["meta.json", "state.bin"]);
    }

    #[test]
    fn empty_truncated_or_tampered_snapshots_are_rejected() {
        let err = check(&mut &b""[..]).unwrap_err().to_string();
        assert!(err.contains("rejected"), "{err}");
        let data = snapshot(&[7u8; 100_000], false);
        for cut in [10, data.len() / 2, data.len() - 5] {
            let err = check(&mut &data[..cut]).unwrap_err().to_string();
            assert!(err.contains("rejected"), "cut at {cut}: {err}");
        }
        let err = check(&mut &snapshot(&[7u8; 1000], true)[..]).unwrap_err().to_string();
        assert!(err.contains("does not match SHA256SUMS"), "{err}");
        let err = check(&mut &snapshot(b"", false)[..]).unwrap_err().to_string();
        assert!(err.contains("state.bin is empty"), "{err}");
    }
}
