//! Deltas and index diffs in the repository (issue 11), checked with the real apt-get, dpkg-deb
//! and our `debfleet delta` tool.

use std::process::Command;
use std::time::Duration;

use debfleet_tests::repo::*;
use debfleet_tests::{bin, wait_for};

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", text(out));
}

fn keyring(server: &RepoServer) -> Vec<u8> {
    std::fs::read(server.root.join("public/debfleet-archive-keyring.gpg")).unwrap()
}

fn deltas_index(server: &RepoServer) -> String {
    std::fs::read_to_string(server.root.join("public/dists/stable/main/binary-amd64/Deltas")).unwrap_or_default()
}

/// (from, to, filename, sha256) of every delta the index lists for `name`.
fn listed(server: &RepoServer, name: &str) -> Vec<(String, String, String, String)> {
    deltas_index(server)
        .split("\n\n")
        .filter(|s| s.contains(&format!("Package: {name}\n")))
        .map(|s| {
            let f = |k: &str| s.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).unwrap_or_default().to_owned();
            (f("From-Version"), f("To-Version"), f("Filename"), f("SHA256"))
        })
        .collect()
}

fn pairs(server: &RepoServer, name: &str) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = listed(server, name).into_iter().map(|(a, b, _, _)| (a, b)).collect();
    p.sort();
    p
}

fn wait_pairs(server: &RepoServer, name: &str, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    wait_for(Duration::from_secs(60), &format!("the delta index to list {want:?}"), || {
        (pairs(server, name) == want).then_some(())
    });
}

fn fsys(deb: &std::path::Path) -> Vec<u8> {
    let out = Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb).output().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn deltas_are_built_signed_fetched_by_apt_and_follow_retention() {
    let server = RepoServer::start(&["--retention", "2"]);
    let work = tempfile::tempdir().unwrap();
    let v: Vec<_> =
        ["1.0", "2.0", "3.0", "4.0", "5.0"].iter().map(|ver| bulky_deb(work.path(), "df-bulky", ver)).collect();
    ok(&server.publish(&v[0], "stable"));
    ok(&server.publish(&v[1], "stable"));
    wait_pairs(&server, "df-bulky", &[("1.0", "2.0")]);

    // apt, with the index target the agent package ships, fetches the index and checks it
    // against the signed Release.
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    let target =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/debfleet-agent/50debfleet-deltas"))
            .unwrap();
    apt.configure(&target);
    ok(&apt.update());
    assert_eq!(apt.list("Deltas").unwrap(), deltas_index(&server).into_bytes(), "apt holds the index as served");
    let release = std::fs::read_to_string(server.root.join("public/dists/stable/Release")).unwrap();
    assert!(release.contains("main/binary-amd64/Deltas\n"), "{release}");

    // The served delta rebuilds 2.0 from 1.0 exactly, and is far smaller.
    let (_, _, file, _) = listed(&server, "df-bulky").remove(0);
    let delta = server.root.join("public").join(&file);
    let out = work.path().join("rebuilt.deb");
    let res = Command::new(bin("debfleet"))
        .args(["delta", "apply"])
        .arg(&v[0])
        .arg(&delta)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    ok(&res);
    assert_eq!(fsys(&out), fsys(&v[1]));
    let (d, full) = (std::fs::metadata(&delta).unwrap().len(), std::fs::metadata(&v[1]).unwrap().len());
    assert!(d * 5 < full, "delta {d} bytes for a {full} byte package");

    // Retention (2 versions): 3.0 pushes 1.0 out, and its delta goes with it.
    ok(&server.publish(&v[2], "stable"));
    wait_pairs(&server, "df-bulky", &[("2.0", "3.0")]);
    // Publishes racing each other (and the builder) end with the index the suite wants, every
    // listed file present with the listed hash.
    let (s1, s2) = (&server, &server);
    std::thread::scope(|s| {
        s.spawn(|| ok(&s1.publish(&v[3], "stable")));
        s.spawn(|| ok(&s2.publish(&v[4], "stable")));
    });
    wait_pairs(&server, "df-bulky", &[("4.0", "5.0")]);
    for (_, _, file, sha) in listed(&server, "df-bulky") {
        let bytes = std::fs::read(server.root.join("public").join(&file)).unwrap();
        assert_eq!(debfleet_tests::sha256_hex(&bytes), sha, "{file}");
    }
    ok(&apt.update());
    assert_eq!(apt.list("Deltas").unwrap(), deltas_index(&server).into_bytes());

    // A delta is no package: uploading one is refused and leaves nothing behind; asking for
    // one that does not exist is a 404.
    let before = server.pool_files();
    let res = server.publish(&delta, "stable");
    assert!(!res.status.success(), "{}", text(&res));
    assert!(text(&res).contains("400") || text(&res).to_lowercase().contains("not"), "{}", text(&res));
    assert_eq!(server.pool_files(), before);
    let (code, _) = raw_http(
        server.port,
        "GET /pool/main/d/df-bulky/df-bulky_0.1_to_9.9_all.debdelta HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
        true,
    );
    assert_eq!(code, 404);

    // `deltas --rebuild` makes them again, the same.
    let sha_before = listed(&server, "df-bulky");
    let res =
        Command::new(bin("debfleet-repo")).args(["deltas", "--rebuild", "--root"]).arg(&server.root).output().unwrap();
    ok(&res);
    assert!(text(&res).contains("df-bulky all\t4.0 -> 5.0"), "{}", text(&res));
    assert_eq!(listed(&server, "df-bulky"), sha_before);
}

#[test]
fn index_diffs_bring_apt_lists_up_to_date_for_a_few_kilobytes() {
    let server = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let debs: Vec<_> =
        (0..300).map(|i| build_deb(work.path(), &format!("df-many-{i}"), "1.0", "all", "", false)).collect();
    let res = Command::new(bin("debfleet-repo"))
        .args(["import", "--suite", "stable", "--root"])
        .arg(&server.root)
        .args(&debs)
        .output()
        .unwrap();
    ok(&res);
    // The server re-reads the suite another process changed on its next change.
    ok(&server.publish(&build_deb(work.path(), "df-first", "1.0", "all", "", false), "stable"));
    let apt = AptSandbox::new(&server.url(), "stable", &keyring(&server));
    ok(&apt.update());
    let full_xz =
        std::fs::metadata(server.root.join("public/dists/stable/main/binary-amd64/Packages.xz")).unwrap().len();

    for round in 0..3 {
        ok(&server.publish(&build_deb(work.path(), &format!("df-late-{round}"), "1.0", "all", "", false), "stable"));
        if round == 1 {
            // Two publications behind: the merged patch takes this client straight to current.
            ok(&server.publish(&build_deb(work.path(), "df-late-extra", "1.0", "all", "", false), "stable"));
        }
        let out = apt.update();
        ok(&out);
        let log = text(&out);
        assert!(
            log.contains("Packages.diff/Index") || log.contains("Packages.diff"),
            "apt used the index diffs:\n{log}"
        );
        let fetched = debfleet_apt::fetched(&log);
        let served = std::fs::read(server.root.join("public/dists/stable/main/binary-amd64/Packages")).unwrap();
        assert_eq!(apt.list("Packages").unwrap(), served, "the patched list is the full index, byte for byte");
        assert!(
            fetched * 2 < full_xz + 4096,
            "round {round}: fetched {fetched} bytes; the full Packages.xz is {full_xz}"
        );
    }
}

#[test]
fn a_pair_whose_making_died_is_skipped_rather_than_tried_forever() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("repo");
    let repo = |args: &[&str]| Command::new(bin("debfleet-repo")).args(args).arg("--root").arg(&root).output().unwrap();
    ok(&repo(&["init"]));
    for v in ["1.0", "2.0"] {
        let deb = bulky_deb(work.path(), "df-bulky", v);
        ok(&Command::new(bin("debfleet-repo"))
            .args(["import", "--suite", "stable", "--root"])
            .arg(&root)
            .arg(deb)
            .output()
            .unwrap());
    }
    // What the builder leaves on disk while it makes a delta, as if the process had died then.
    std::fs::write(root.join("delta-attempt.json"), r#"["stable","df-bulky","all","1.0","2.0"]"#).unwrap();
    let out = repo(&["deltas"]);
    ok(&out);
    assert!(text(&out).contains("skipped: making it did not finish"), "{}", text(&out));
    assert!(!root.join("delta-attempt.json").exists());
    // --rebuild tries it again, and it is made.
    let out = repo(&["deltas", "--rebuild"]);
    ok(&out);
    assert!(text(&out).contains(".debdelta"), "{}", text(&out));
}
