//! The apt repository server (issue 3), checked with the real apt-get, gpgv and dpkg-deb.

use std::thread;

use debfleet_tests::repo::*;

fn keyring(server: &RepoServer) -> Vec<u8> {
    std::fs::read(server.root.join("public/debfleet-archive-keyring.gpg")).unwrap()
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", text(out));
}

#[test]
fn apt_installs_from_the_signed_repository() {
    let server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let all = build_deb(work.path(), "df-hello", "1.0-1", "all", "", false);
    let amd = build_deb(work.path(), "df-native", "2.0", "amd64", "", false);
    let arm = build_deb(work.path(), "df-native", "2.0", "arm64", "", false);
    for deb in [&all, &amd, &arm] {
        let out = server.publish(deb, "stable");
        ok(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v[0]["result"]["status"], "published");
        assert_eq!(v[0]["result"]["sha256"].as_str().unwrap().len(), 64);
    }
    // The key is served, and the binary form is what signed-by= takes.
    let (code, _) = raw_http(
        server.port,
        "GET /debfleet-archive-keyring.gpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
        true,
    );
    assert_eq!(code, 200);
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    ok(&apt.update());
    ok(&apt.install("df-hello"));
    ok(&apt.install("df-native"));
    assert_eq!(apt.installed("df-hello").as_deref(), Some("1.0-1"));
    assert_eq!(apt.installed("df-native").as_deref(), Some("2.0"));
    assert_eq!(std::fs::read_to_string(apt.root().join("usr/share/df-native/version")).unwrap(), "2.0\n");
    // Every index an apt client can ask for exists, signed and by hash.
    for f in ["InRelease", "Release", "Release.gpg", "main/binary-arm64/Packages.xz", "main/binary-armhf/Packages.gz"] {
        assert!(server.root.join("public/dists/stable").join(f).exists(), "{f}");
    }
    let release = std::fs::read_to_string(server.root.join("public/dists/stable/Release")).unwrap();
    assert!(release.contains("Acquire-By-Hash: yes"));
    // Architecture: all goes into every binary index.
    let armhf = std::fs::read_to_string(server.root.join("public/dists/stable/main/binary-armhf/Packages")).unwrap();
    assert!(armhf.contains("Package: df-hello") && !armhf.contains("Package: df-native"));
    // Range requests work (apt resumes partial downloads).
    let head = "GET /dists/stable/Release HTTP/1.1\r\nHost: x\r\nRange: bytes=0-5\r\nConnection: close\r\n\r\n";
    let (code, body) = raw_http(server.port, head, b"", true);
    assert_eq!((code, body.as_str()), (206, "Origin"));
    assert!(server.log().contains("GET /dists/stable/InRelease 200"), "one log line per request");
}

#[test]
fn a_wrong_key_makes_apt_update_fail() {
    let server = RepoServer::start(&[]);
    let other = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    ok(&server.publish(&build_deb(work.path(), "df-x", "1", "all", "", false), "stable"));
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&other));
    let out = apt.update();
    assert!(!out.status.success(), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("NO_PUBKEY") || msg.contains("not signed") || msg.contains("signature"), "{msg}");
}

#[test]
fn retention_keeps_the_last_versions_and_promotion_copies_without_upload() {
    let server = RepoServer::start(&["--retention", "2"]);
    let work = tempfile::tempdir().unwrap();
    for v in ["1.0", "1.10", "1.2~rc1", "1.2"] {
        ok(&server.publish(&build_deb(work.path(), "df-app", v, "all", "", false), "testing"));
    }
    // Debian ordering: 1.2~rc1 < 1.2 < 1.10; the two newest stay.
    let versions: Vec<String> = server.listing().into_iter().map(|(_, _, v, _)| v).collect();
    assert_eq!(versions, ["1.10", "1.2"]);
    // The pruned versions' files stay while indices that clients may still hold name them.
    assert_eq!(
        server.pool_files(),
        ["df-app_1.0_all.deb", "df-app_1.10_all.deb", "df-app_1.2_all.deb", "df-app_1.2~rc1_all.deb"]
    );
    let out = server.console(&["promote", "df-app=1.2", "--from", "testing", "--to", "stable"]);
    ok(&out);
    assert!(server.listing().contains(&("stable".into(), "df-app".into(), "1.2".into(), "all".into())));
    assert_eq!(server.pool_files().len(), 4, "promotion shares the pool file");
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    ok(&apt.update());
    ok(&apt.install("df-app"));
    assert_eq!(apt.installed("df-app").as_deref(), Some("1.2"));
    // Explicit removal; rollback targets are what retention keeps.
    ok(&server.console(&["unpublish", "df-app=1.2", "--suite", "testing"]));
    assert_eq!(server.listing().iter().filter(|l| l.0 == "testing").count(), 1);
    assert_eq!(server.pool_files().len(), 4, "still used by stable");
    let out = server.console(&["unpublish", "df-app=9.9", "--suite", "testing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("404"));
}

#[test]
fn bad_input_is_refused_and_writes_nothing() {
    let server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let good = build_deb(work.path(), "df-good", "1.0", "all", "", false);
    ok(&server.publish(&good, "stable"));
    let before = (server.listing(), server.pool_files());
    let token = server.token.clone();
    let port = server.port;
    let post =
        |suite: &str, body: &[u8], token: &str| raw_http(port, &upload_head(suite, token, body.len()), body, true);
    let good_bytes = std::fs::read(&good).unwrap();

    assert_eq!(post("stable", b"definitely not a deb", &token).0, 400);
    let (code, body) = post("stable", &good_bytes[..good_bytes.len() / 2], &token);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("truncated"), "{body}");
    let (code, body) = raw_http(port, &upload_head("stable", &token, good_bytes.len()), &good_bytes[..100], false);
    assert_eq!(code, 400, "upload cut short: {body}");
    for suite in ["Stable", "..", "a..b", "-x", "x%2Fy"] {
        let (code, body) = post(suite, &good_bytes, &token);
        assert!(code == 400 || code == 404, "suite {suite:?}: {code} {body}");
    }
    assert_eq!(post("stable", &good_bytes, "").0, 401);
    assert_eq!(post("stable", &good_bytes, "dfr_0000").0, 403);
    let (code, _) = raw_http(
        port,
        "POST /api/v1/suites/stable/packages HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n",
        b"abc",
        true,
    );
    assert_eq!(code, 401);
    // Hostile control data: a reserved field, a field with an escape sequence, a bad name.
    for (name, extra) in [("df-evil", "Filename: ../../../etc/shadow\n"), ("df-evil2", "X-Note: \u{1b}[31mred\n")] {
        let deb = build_deb(work.path(), name, "1.0", "all", extra, true);
        let (code, body) = post("stable", &std::fs::read(&deb).unwrap(), &token);
        assert_eq!(code, 400, "{name}: {body}");
    }
    let deb = build_deb(work.path(), "Df-Upper", "1.0", "all", "", true);
    assert_eq!(post("stable", &std::fs::read(&deb).unwrap(), &token).0, 400);
    let deb = build_deb(work.path(), "df-arch", "1.0", "s390x", "", true);
    let (code, body) = post("stable", &std::fs::read(&deb).unwrap(), &token);
    assert_eq!(code, 400, "{body}");
    // Same name, version, arch, different content: 409. Identical: a no-op.
    let twin = build_deb(work.path(), "df-good", "1.0", "all", "X-Changed: yes\n", false);
    let out = server.publish(&twin, "stable");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("409"), "{}", text(&out));
    let out = server.publish(&good, "stable");
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
    assert_eq!((server.listing(), server.pool_files()), before, "nothing was written");
    // Each server process keeps its uploads in progress in tmp/PID/.
    let left: usize = std::fs::read_dir(server.root.join("tmp"))
        .unwrap()
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).map(|r| r.count()).unwrap_or(1))
        .sum();
    assert_eq!(left, 0, "no upload left behind");

    // A revoked token stops working at once.
    let team = std::process::Command::new(debfleet_tests::bin("debfleet-repo"))
        .args(["token", "add", "team-b", "--root"])
        .arg(&server.root)
        .output()
        .unwrap();
    let team_token = String::from_utf8(team.stdout).unwrap().trim().to_owned();
    let other = build_deb(work.path(), "df-team", "1.0", "all", "", false);
    assert_eq!(post("stable", &std::fs::read(&other).unwrap(), &team_token).0, 201);
    let revoked = std::process::Command::new(debfleet_tests::bin("debfleet-repo"))
        .args(["token", "revoke", "team-b", "--root"])
        .arg(&server.root)
        .output()
        .unwrap();
    ok(&revoked);
    let (code, body) = post("stable", &std::fs::read(&other).unwrap(), &team_token);
    assert_eq!(code, 403);
    assert!(body.contains("revoked"), "{body}");
}

#[test]
fn oversized_uploads_are_refused() {
    let mut server = RepoServer::start(&[]);
    let cfg_path = server.root.join("repo.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["max_upload_bytes"] = 300.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    server.kill9();
    server.spawn(None);
    let work = tempfile::tempdir().unwrap();
    let deb = build_deb(work.path(), "df-big", "1.0", "all", &format!("X-Pad: {}\n", "x".repeat(5000)), false);
    let (code, body) = raw_http(
        server.port,
        &upload_head("stable", &server.token, std::fs::metadata(&deb).unwrap().len() as usize),
        &std::fs::read(&deb).unwrap(),
        true,
    );
    assert_eq!(code, 413, "{body}");
    assert!(server.listing().is_empty());
}

#[test]
fn publishes_race_with_apt_clients_and_each_other() {
    let server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    ok(&server.publish(&build_deb(work.path(), "df-base", "1", "all", "", false), "stable"));
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    let debs_a: Vec<_> =
        (1..=6).map(|i| build_deb(work.path(), "df-race-a", &format!("{i}.0"), "all", "", false)).collect();
    let debs_b: Vec<_> =
        (1..=6).map(|i| build_deb(work.path(), "df-race-b", &format!("{i}.0"), "amd64", "", false)).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut updates = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) || updates < 3 {
                let out = apt.update();
                assert!(out.status.success(), "apt saw an inconsistent repository during publishes:\n{}", text(&out));
                updates += 1;
            }
            updates
        });
        let a = s.spawn(|| debs_a.iter().for_each(|d| ok(&server.publish(d, "stable"))));
        let b = s.spawn(|| debs_b.iter().for_each(|d| ok(&server.publish(d, "stable"))));
        a.join().unwrap();
        b.join().unwrap();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let updates = reader.join().unwrap();
        assert!(updates >= 3);
    });
    let names: Vec<String> = server.listing().into_iter().map(|(_, n, v, _)| format!("{n}={v}")).collect();
    for want in ["df-race-a=6.0", "df-race-a=2.0", "df-race-b=6.0", "df-race-b=2.0", "df-base=1"] {
        assert!(names.contains(&want.to_string()), "{want} missing from {names:?}");
    }
    ok(&apt.update());
    ok(&apt.install("df-race-b"));
    assert_eq!(apt.installed("df-race-b").as_deref(), Some("6.0"));
}

#[test]
fn a_crash_at_any_point_of_a_publish_leaves_a_consistent_signed_repository() {
    let mut server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    ok(&server.publish(&build_deb(work.path(), "df-stable", "1.0", "all", "", false), "stable"));
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    // (failpoint, whether the interrupted publish is there after the restart)
    let points = [("after-pool", false), ("after-db", true), ("after-by-hash", true), ("before-inrelease", true)];
    for (i, (point, survives)) in points.iter().enumerate() {
        server.kill9();
        server.spawn(Some(point));
        let version = format!("2.{i}");
        let deb = build_deb(work.path(), "df-crash", &version, "all", "", false);
        let out = server.publish(&deb, "stable");
        assert!(!out.status.success(), "{point}: the server should have died");
        server.wait_dead();
        // While it is down the files on disk are what a reader gets: still consistent.
        server.spawn(None);
        let out = apt.update();
        assert!(out.status.success(), "{point}: {}", text(&out));
        let listed = server.listing().iter().any(|(_, n, v, _)| n == "df-crash" && *v == version);
        assert_eq!(listed, *survives, "{point}");
        let packages =
            std::fs::read_to_string(server.root.join("public/dists/stable/main/binary-amd64/Packages")).unwrap();
        assert_eq!(packages.contains(&format!("Version: {version}")), *survives, "{point}: indices match the database");
        if !survives {
            assert!(!server.pool_files().iter().any(|f| f.contains(&version)), "{point}: orphan removed");
        }
    }
    ok(&apt.install("df-crash"));
    assert_eq!(apt.installed("df-crash").as_deref(), Some("2.3"));
    // And a plain kill -9 in the middle of a stream of publishes.
    let debs: Vec<_> = (0..8).map(|i| build_deb(work.path(), "df-kill", &format!("3.{i}"), "all", "", false)).collect();
    let pid = server.pid();
    thread::scope(|s| {
        let publisher = s.spawn(|| debs.iter().filter(|d| server.publish(d, "stable").status.success()).count());
        thread::sleep(std::time::Duration::from_millis(120));
        // SAFETY: kill(2) on the server process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        publisher.join().unwrap()
    });
    server.kill9();
    server.spawn(None);
    ok(&apt.update());
    let listed: Vec<String> = server.listing().into_iter().filter(|l| l.1 == "df-kill").map(|l| l.2).collect();
    let packages = std::fs::read_to_string(server.root.join("public/dists/stable/main/binary-amd64/Packages")).unwrap();
    for v in &listed {
        assert!(packages.contains(&format!("Version: {v}")), "{v} listed but not indexed");
    }
    assert_eq!(packages.matches("Package: df-kill").count(), listed.len());
}

#[test]
fn an_existing_key_can_be_imported() {
    let first = RepoServer::start(&[]);
    let key = first.root.join("keys/signing.asc");
    let second = RepoServer::start(&["--import-key", key.to_str().unwrap()]);
    assert_eq!(keyring(&first), keyring(&second), "same public key served");
    let work = tempfile::tempdir().unwrap();
    ok(&second.publish(&build_deb(work.path(), "df-imported", "1.0", "all", "", false), "stable"));
    // A client trusting the first repository's key accepts the second's signatures.
    let apt = AptSandbox::new(&second.url(), "stable", &keyring(&first));
    ok(&apt.update());
    // Garbage is refused at init.
    let bad = work.path().join("bad.asc");
    std::fs::write(&bad, "not a key").unwrap();
    let out = std::process::Command::new(debfleet_tests::bin("debfleet-repo"))
        .args(["init", "--root"])
        .arg(work.path().join("r3"))
        .arg("--import-key")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("secret key"), "{}", text(&out));
}

/// `debfleet-repo import` into the server's repository, as a second process.
fn import(server: &RepoServer, deb: &std::path::Path) -> std::process::Output {
    std::process::Command::new(debfleet_tests::bin("debfleet-repo"))
        .args(["import", "--suite", "stable", "--root"])
        .arg(&server.root)
        .arg(deb)
        .output()
        .unwrap()
}

#[test]
fn an_import_while_the_server_runs_is_kept_and_both_install() {
    let server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    ok(&server.publish(&build_deb(work.path(), "df-served", "1.0", "all", "", false), "stable"));
    // An upload is streaming into the server while the import runs.
    let deb = std::fs::read(build_deb(work.path(), "df-streamed", "1.0", "all", "", false)).unwrap();
    let mut upload = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    use std::io::{Read, Write};
    upload.write_all(upload_head("stable", &server.token, deb.len()).as_bytes()).unwrap();
    upload.write_all(&deb[..deb.len() / 2]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));

    let imported = build_deb(work.path(), "df-imported", "1.0", "all", "", false);
    ok(&import(&server, &imported));
    upload.write_all(&deb[deb.len() / 2..]).unwrap();
    let mut resp = String::new();
    let _ = upload.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 201"), "the in-flight upload survived the import: {resp}");
    // The server's next commit starts from the database the import wrote.
    ok(&server.publish(&build_deb(work.path(), "df-after", "1.0", "all", "", false), "stable"));
    let names: Vec<String> = server.listing().into_iter().map(|l| l.1).collect();
    assert_eq!(names, ["df-after", "df-imported", "df-served", "df-streamed"]);
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    ok(&apt.update());
    for p in ["df-imported", "df-after", "df-streamed"] {
        ok(&apt.install(p));
        assert_eq!(apt.installed(p).as_deref(), Some("1.0"), "{p}");
    }
}

#[test]
fn an_orphan_pool_file_is_replaced_not_reused_for_other_bytes() {
    let server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    // What an interrupted publish of other bytes under the same name leaves behind.
    let orphan = server.root.join("public/pool/main/d/df-orphan/df-orphan_1.0_all.deb");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"left by an interrupted change").unwrap();
    ok(&server.publish(&build_deb(work.path(), "df-orphan", "1.0", "all", "", false), "stable"));
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    ok(&apt.update());
    ok(&apt.install("df-orphan"));
    assert_eq!(apt.installed("df-orphan").as_deref(), Some("1.0"));
    // The same through an import.
    let orphan = server.root.join("public/pool/main/d/df-orphan2/df-orphan2_1.0_all.deb");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"junk").unwrap();
    let deb = build_deb(work.path(), "df-orphan2", "1.0", "all", "", false);
    ok(&import(&server, &deb));
    ok(&server.publish(&build_deb(work.path(), "df-nudge", "1.0", "all", "", false), "stable"));
    ok(&apt.update());
    ok(&apt.install("df-orphan2"));
}

#[test]
fn retention_keeps_pool_files_that_live_indices_name_and_refuses_what_it_would_drop() {
    let server = RepoServer::start(&["--retention", "2"]);
    let work = tempfile::tempdir().unwrap();
    for v in ["1.0", "2.0"] {
        ok(&server.publish(&build_deb(work.path(), "df-ret", v, "all", "", false), "stable"));
    }
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    ok(&apt.update());
    // 3.0 pushes 1.0 out of retention; a device whose lists are a minute old still gets 1.0
    // (a typical rollback target).
    ok(&server.publish(&build_deb(work.path(), "df-ret", "3.0", "all", "", false), "stable"));
    ok(&apt.install("df-ret=1.0"));
    assert_eq!(apt.installed("df-ret").as_deref(), Some("1.0"));
    // Removal likewise.
    ok(&server.console(&["unpublish", "df-ret=2.0", "--suite", "stable"]));
    ok(&apt.install("df-ret=2.0"));
    // A version older than everything kept would be dropped at once: refused, not a 201.
    ok(&server.publish(&build_deb(work.path(), "df-ret", "4.0", "all", "", false), "stable"));
    let out = server.publish(&build_deb(work.path(), "df-ret", "0.5", "all", "", false), "stable");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("older than all 2 versions"), "{}", text(&out));
    assert!(!server.listing().iter().any(|l| l.2 == "0.5"));
    assert!(!server.pool_files().iter().any(|f| f.contains("0.5")));
}

#[test]
fn a_crash_while_switching_release_leaves_a_matching_signature() {
    let mut server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    ok(&server.publish(&build_deb(work.path(), "df-pair", "1.0", "all", "", false), "stable"));
    server.kill9();
    server.spawn(Some("between-release-files"));
    let out = server.publish(&build_deb(work.path(), "df-pair", "2.0", "all", "", false), "stable");
    assert!(!out.status.success());
    server.wait_dead();
    // While it is down, the pair a reader finds verifies.
    let dists = server.root.join("public/dists/stable");
    let out = std::process::Command::new("gpgv")
        .arg("--keyring")
        .arg(server.root.join("public/debfleet-archive-keyring.gpg"))
        .arg(dists.join("Release.gpg"))
        .arg(dists.join("Release"))
        .output()
        .unwrap();
    ok(&out);
    server.spawn(None);
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    ok(&apt.update());
}

#[test]
fn secrets_are_never_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    // With a permissive umask, and the process stopped right after it created the key's
    // temporary file: that file is already private.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" init --root \"$1\"")
        .arg(debfleet_tests::bin("debfleet-repo"))
        .arg(&root)
        .env("DEBFLEET_REPO_FAILPOINT", "temp-file-created")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let tmp: Vec<_> = std::fs::read_dir(root.join("keys")).unwrap().flatten().collect();
    assert_eq!(tmp.len(), 1, "{tmp:?}");
    assert_eq!(tmp[0].metadata().unwrap().permissions().mode() & 0o777, 0o600, "{:?}", tmp[0].path());
    // And a completed init leaves the key and the tokens private.
    let root2 = dir.path().join("repo2");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" init --root \"$1\"")
        .arg(debfleet_tests::bin("debfleet-repo"))
        .arg(&root2)
        .output()
        .unwrap();
    ok(&out);
    for f in ["keys/signing.asc", "tokens.json"] {
        assert_eq!(std::fs::metadata(root2.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
    }
}

#[test]
fn the_publish_token_is_not_sent_over_plain_http_to_another_machine() {
    let work = tempfile::tempdir().unwrap();
    let deb = build_deb(work.path(), "df-secret", "1.0", "all", "", false);
    // 192.0.2.1 is a documentation address nothing answers on.
    let publish = |extra: &[&str]| {
        std::process::Command::new(debfleet_tests::bin("debfleet"))
            .arg("publish")
            .arg(&deb)
            .args(["--suite", "stable", "--repo", "http://192.0.2.1:8080", "--token", "dfr_secret"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = publish(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("refusing to send the publish token over plain http:// to 192.0.2.1"), "{err}");
    // With --insecure it is sent (and said so); here nothing answers, so it fails later.
    let out = publish(&["--insecure"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: sending the publish token over plain http:// to 192.0.2.1 (--insecure)"), "{err}");
    assert_ne!(out.status.code(), Some(0));
}

fn release_field(text: &str, field: &str) -> Option<std::time::SystemTime> {
    let value = text.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?.trim().replace("UTC", "GMT");
    httpdate::parse_http_date(&value).ok()
}

#[test]
fn a_release_past_valid_until_is_refused_by_apt_and_the_server_signs_it_again_in_time() {
    let server = RepoServer::start(&["--valid-for", "8s"]);
    let work = tempfile::tempdir().unwrap();
    ok(&server.publish(&build_deb(work.path(), "df-fresh", "1.0", "all", "", false), "stable"));
    let dists = server.root.join("public/dists/stable");
    let first = std::fs::read_to_string(dists.join("InRelease")).unwrap();
    let until = release_field(&first, "Valid-Until").expect("Valid-Until in InRelease");
    let date = release_field(&first, "Date").unwrap();
    assert_eq!(until.duration_since(date).unwrap().as_secs(), 8, "{first}");
    // What an attacker (or a stale mirror) could keep serving: the repository as it is now.
    let replay = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("cp")
        .arg("-rL")
        .arg(server.root.join("public/dists"))
        .arg(replay.path())
        .output()
        .unwrap();
    ok(&out);
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    ok(&apt.update());
    std::thread::sleep(
        until.duration_since(std::time::SystemTime::now()).unwrap_or_default() + std::time::Duration::from_secs(2),
    );
    // The served repository was signed again before it lapsed: a device that updates now takes it.
    let now = std::fs::read_to_string(dists.join("InRelease")).unwrap();
    assert!(release_field(&now, "Valid-Until").unwrap() > std::time::SystemTime::now(), "{now}");
    assert_eq!(
        now.lines().find(|l| l.starts_with("X-Debfleet-Generation")),
        first.lines().find(|l| l.starts_with("X-Debfleet-Generation")),
        "same indices, same generation"
    );
    assert!(server.log().contains("Release signed again"), "{}", server.log());
    ok(&apt.update());
    ok(&apt.install("df-fresh"));
    // The replayed copy is past its Valid-Until: real apt refuses it, signature and all.
    let port = serve_files(replay.path());
    let stale = AptSandbox::new(&format!("http://127.0.0.1:{port}"), "stable", &keyring(&server));
    let out = stale.update();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("expired"), "{}", text(&out));
    assert!(stale.list("Packages").is_none(), "no index taken from an expired Release");
}

#[test]
fn a_team_token_changes_only_its_packages_in_its_suites() {
    let server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let add = std::process::Command::new(debfleet_tests::bin("debfleet-repo"))
        .args(["token", "add", "acme", "--packages", "acme-*", "--suites", "testing", "--root"])
        .arg(&server.root)
        .output()
        .unwrap();
    ok(&add);
    let acme_token = String::from_utf8(add.stdout).unwrap().trim().to_owned();
    let as_acme = |args: &[&str]| {
        std::process::Command::new(debfleet_tests::bin("debfleet"))
            .args(args)
            .env("DEBFLEET_REPO", server.url())
            .env("DEBFLEET_TOKEN", &acme_token)
            .env("DEBFLEET_CONFIG", "/nonexistent")
            .output()
            .unwrap()
    };
    let ours = build_deb(work.path(), "acme-led", "1.0", "all", "", false);
    let theirs = build_deb(work.path(), "df-other", "1.0", "all", "", false);
    ok(&as_acme(&["publish", ours.to_str().unwrap(), "--suite", "testing"]));
    let out = as_acme(&["publish", theirs.to_str().unwrap(), "--suite", "testing"]);
    assert!(
        !out.status.success() && text(&out).contains("may change only packages acme-*, not df-other"),
        "{}",
        text(&out)
    );
    let out = as_acme(&["publish", ours.to_str().unwrap(), "--suite", "stable"]);
    assert!(
        !out.status.success() && text(&out).contains("may change only suites testing, not stable"),
        "{}",
        text(&out)
    );
    let out = as_acme(&["promote", "acme-led=1.0", "--from", "testing", "--to", "stable"]);
    assert!(!out.status.success() && text(&out).contains("not stable"), "{}", text(&out));
    // The admin token (unscoped) puts another team's package in testing; acme cannot remove it.
    ok(&server.publish(&theirs, "testing"));
    let out = as_acme(&["unpublish", "df-other=1.0", "--suite", "testing"]);
    assert!(!out.status.success() && text(&out).contains("not df-other"), "{}", text(&out));
    let listing = server.listing();
    assert!(listing.iter().any(|l| l.0 == "testing" && l.1 == "df-other"), "{listing:?}");
    assert!(!listing.iter().any(|l| l.0 == "stable"), "{listing:?}");
    // Nothing refused left a file behind.
    assert!(!server.pool_files().iter().any(|f| f.contains("stable")), "{:?}", server.pool_files());
    let list = std::process::Command::new(debfleet_tests::bin("debfleet-repo"))
        .args(["token", "list", "--root"])
        .arg(&server.root)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("acme\t")
            && String::from_utf8_lossy(&list.stdout).contains("packages acme-* suites testing")
    );
}
