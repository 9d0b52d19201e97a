//! What `deploy/` ships holds: the systemd unit passes `systemd-analyze verify` (where systemd
//! is installed), and every flag it and `docs/deploy.md` give the server is one the server
//! takes.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const SERVER: &str = env!("CARGO_BIN_EXE_kvstore-server");
const UNIT: &str = include_str!("../deploy/kvstore.service");
const GUIDE: &str = include_str!("../docs/deploy.md");

/// Every `--flag` on a line of `text` that runs the server (continuation lines joined): the
/// unit's ExecStart, the env file's KVSTORE_ARGS, the guide's commands.
fn server_flags(text: &str) -> BTreeSet<String> {
    let joined = text.replace("\\\n", " ");
    (joined.lines())
        .filter(|line| line.contains("kvstore-server ") || line.contains("KVSTORE_ARGS="))
        .flat_map(str::split_whitespace)
        .filter_map(|word| {
            let flag = word.trim_matches(|c| c == '`' || c == ',' || c == '.' || c == ')');
            let name = flag.strip_prefix("--")?.split('=').next()?;
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
                .then(|| format!("--{name}"))
        })
        .collect()
}

#[test]
fn every_flag_in_the_unit_and_the_guide_is_one_the_server_takes() {
    let help = Command::new(SERVER).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let unit = server_flags(UNIT);
    assert!(
        unit.contains("--data-dir") && unit.contains("--peer"),
        "{unit:?}"
    );
    let guide = server_flags(GUIDE);
    assert!(guide.contains("--restore"), "{guide:?}");
    for flag in unit.iter().chain(&guide) {
        if flag == "--help" || flag == "--version" {
            continue;
        }
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{flag} is not a kvstore-server flag"
        );
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed here: the unit is not verified");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    // Verify checks that the binary exists: point it at the one just built.
    let unit = UNIT.replace("/usr/local/bin/kvstore-server", SERVER);
    let path = dir.path().join("kvstore.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(Path::new(&path))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings: any output at all fails the test.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}
