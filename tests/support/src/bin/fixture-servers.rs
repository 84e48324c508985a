//! Runs the real fixture servers (PostgreSQL, OpenBao, s3s-fs) for the shell
//! system tests, which cannot use this crate's Rust API, until stdin closes or
//! the process is signalled.
//!
//! `fixture-servers OUT_DIR GUEST_DIR` writes into OUT_DIR:
//! - `fixtures.toml`: a platform-agent drop-in with `[object_store]` on the S3
//!   server and two backup jobs, `pg` (database `app`) and `vault` (raft
//!   snapshot, age-encrypted), whose credential files are named under
//!   GUEST_DIR (the test copies OUT_DIR's files there);
//! - the credential files themselves;
//! - `env`: shell assignments (ports, the S3 server's data dir) for checks;
//! - `ready`, last, once everything above is in place.

use std::io::Read;
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use platform_agent_testsupport::{OpenBao, Postgres, S3Server};

const BUCKET: &str = "backups";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, out_dir, guest_dir] = args.as_slice() else {
        eprintln!("usage: fixture-servers OUT_DIR GUEST_DIR");
        std::process::exit(2);
    };
    let out = PathBuf::from(out_dir);
    let guest = PathBuf::from(guest_dir);
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("create {}: {e}", out.display()));

    let pg = Postgres::start();
    pg.psql("CREATE DATABASE app;");
    pg.psql("\\c app\nCREATE TABLE orders AS SELECT i AS id, md5(i::text) AS note FROM generate_series(1, 1000) i;");
    let bao = OpenBao::start();
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);

    let identity = age::x25519::Identity::generate();
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    };
    write("s3-access-key", s3.access_key());
    write("s3-secret-key", s3.secret_key());
    write("vault-role-id", bao.role_id());
    write("vault-secret-id", bao.secret_id());
    write(
        "age-identity.txt",
        &format!("{}\n", identity.to_string().expose_secret()),
    );
    let in_guest = |name: &str| guest.join(name).display().to_string();
    write(
        "fixtures.toml",
        &format!(
            "# Written by tests/support fixture-servers for a system test.\n\
             [object_store]\nbackend = \"s3\"\n\
             [object_store.s3]\nendpoint = \"{endpoint}\"\nbucket = \"{BUCKET}\"\nprefix = \"node\"\n\
             access_key_id_file = \"{access}\"\nsecret_access_key_file = \"{secret}\"\n\
             [backup]\nage_recipients = [\"{recipient}\"]\nage_identity_file = \"{identity}\"\n\
             [[backup.jobs]]\nname = \"pg\"\nkind = \"postgres\"\nretries = 0\n\
             [backup.jobs.postgres]\nhost = \"127.0.0.1\"\nport = {pg_port}\nuser = \"postgres\"\ndatabases = [\"app\"]\n\
             [[backup.jobs]]\nname = \"vault\"\nkind = \"vault\"\nretries = 0\n\
             [backup.jobs.vault]\naddress = \"{bao_addr}\"\napprole_role_id_file = \"{role}\"\napprole_secret_id_file = \"{role_secret}\"\n",
            endpoint = s3.endpoint(),
            access = in_guest("s3-access-key"),
            secret = in_guest("s3-secret-key"),
            recipient = identity.to_public(),
            identity = in_guest("age-identity.txt"),
            pg_port = pg.port(),
            bao_addr = bao.addr(),
            role = in_guest("vault-role-id"),
            role_secret = in_guest("vault-secret-id"),
        ),
    );
    write(
        "env",
        &format!(
            "FIXTURE_PG_PORT={}\nFIXTURE_BAO_ADDR={}\nFIXTURE_S3_ENDPOINT={}\nFIXTURE_S3_DATA_DIR={}\nFIXTURE_S3_BUCKET={BUCKET}\n",
            pg.port(),
            bao.addr(),
            s3.endpoint(),
            shell_quote(s3.data_dir()),
        ),
    );
    write("ready", "");
    eprintln!("fixture-servers: ready in {}", out.display());

    // Until the test closes our stdin (or kills us): the fixtures' Drop stops
    // the servers and removes their directories.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}
