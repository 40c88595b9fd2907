//! Index diffs ("pdiffs") for `Packages`, in apt's merged mode (`X-Patch-Precedence: merged`):
//! each patch turns one older `Packages` straight into the current one, so a client several
//! publications behind downloads one small patch instead of the whole index.
//!
//! What apt 2.6 expects (checked in its source):
//! - `Packages.diff/Index` gives the current file's hash, the old versions (History), the
//!   uncompressed patches and their `.gz` downloads, under the same names. apt takes the patch
//!   of the last History entry matching its local file, from `Packages.diff/NAME.gz`, never
//!   by-hash: a name must never be reused for other content, so names here are made of both hashes.
//! - `rred` takes only the ed commands `Na`, `Nc`, `N,Mc`, `Nd`, `N,Md`, from the end of the file
//!   towards its start, without overlap; a text line that is exactly `.` cannot be written.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use flate2::{write::GzEncoder, Compression};
use serde::{Deserialize, Serialize};

use crate::fsutil::{sha256_hex, write_unsynced};

/// Versions of `Packages` kept per suite and architecture, the current one included.
pub const KEEP: usize = 16;
/// Edits (lines removed + lines added) beyond which the diff gives up and replaces the whole
/// middle: bounds time and memory (the trace holds about MAX_D² numbers); the patch is correct,
/// only bigger. A publish changes a few stanzas, far below this.
const MAX_D: usize = 1000;
/// How long a patch no Index lists any more stays downloadable (for clients holding an older Index).
const GRACE: Duration = Duration::from_secs(3600);

/// An ed script in rred's subset turning `old` into `new` (both `\n`-terminated or empty):
/// `Some("")` when equal, None when it cannot be expressed (an added line is exactly `.`, or a
/// text lacks its final newline).
pub fn ed_script(old: &str, new: &str) -> Option<String> {
    script_with_limit(old, new, MAX_D)
}

fn script_with_limit(old: &str, new: &str, max_d: usize) -> Option<String> {
    if old == new {
        return Some(String::new());
    }
    if !newline_terminated(old) || !newline_terminated(new) {
        return None;
    }
    let a: Vec<&str> = old.split_terminator('\n').collect();
    let b: Vec<&str> = new.split_terminator('\n').collect();
    // Common prefix and suffix first: most of a Packages file is untouched between two versions.
    let pre = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suf = a[pre..].iter().rev().zip(b[pre..].iter().rev()).take_while(|(x, y)| x == y).count();
    let (ma, mb) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    let matches = if ma.is_empty() || mb.is_empty() {
        Vec::new()
    } else {
        // Lines as integers, so the diff compares numbers rather than strings.
        let mut ids = HashMap::new();
        let (ia, ib) = (intern(&mut ids, ma), intern(&mut ids, mb));
        myers(&ia, &ib, max_d).unwrap_or_default()
    };
    // Hunks between matched lines: (old start, old end, new start, new end), 0-based, absolute.
    let mut hunks = Vec::new();
    let (mut i, mut j) = (0, 0);
    for (mi, mj) in matches.into_iter().chain([(ma.len(), mb.len())]) {
        if mi > i || mj > j {
            hunks.push((pre + i, pre + mi, pre + j, pre + mj));
        }
        (i, j) = (mi + 1, mj + 1);
    }
    // Last hunk first (what rred requires); hunks are separated by at least one matched line.
    let mut out = String::new();
    for &(s, e, ns, ne) in hunks.iter().rev() {
        let added = &b[ns..ne];
        if added.iter().any(|l| *l == ".") {
            return None;
        }
        if s == e {
            let _ = writeln!(out, "{s}a");
        } else {
            let op = if added.is_empty() { 'd' } else { 'c' };
            let _ = if e == s + 1 { writeln!(out, "{e}{op}") } else { writeln!(out, "{},{e}{op}", s + 1) };
        }
        if !added.is_empty() {
            for line in added {
                out.push_str(line);
                out.push('\n');
            }
            out.push_str(".\n");
        }
    }
    Some(out)
}

fn newline_terminated(text: &str) -> bool {
    text.is_empty() || text.ends_with('\n')
}

fn intern<'a>(ids: &mut HashMap<&'a str, u32>, lines: &[&'a str]) -> Vec<u32> {
    lines
        .iter()
        .map(|&line| {
            let next = ids.len() as u32;
            *ids.entry(line).or_insert(next)
        })
        .collect()
}

/// Matched pairs (index in `a`, index in `b`), increasing, of a shortest line diff (Myers'
/// greedy O((N+M)·D) algorithm, with the trace kept for the way back). None beyond `max_d` edits.
fn myers(a: &[u32], b: &[u32], max_d: usize) -> Option<Vec<(usize, usize)>> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    // Follows equal lines along diagonal k = x - y from x.
    let snake = |mut x: isize, k: isize| {
        while x < n && x - k < m && a[x as usize] == b[(x - k) as usize] {
            x += 1;
        }
        x
    };
    // trace[d][k + d]: the furthest x reached on diagonal k with d edits, -1 if none.
    let mut trace = vec![vec![snake(0, 0)]];
    let end_k = n - m;
    let mut depth: isize = 0;
    while !(end_k.abs() <= depth && trace[depth as usize][(end_k + depth) as usize] == n) {
        depth += 1;
        if depth as usize > max_d {
            return None;
        }
        let prev = &trace[depth as usize - 1];
        let mut row = vec![-1; 2 * depth as usize + 1];
        for k in (-depth..=depth).step_by(2) {
            if let Some((_, x)) = step(prev, depth, k, n, m) {
                row[(k + depth) as usize] = snake(x, k);
            }
        }
        trace.push(row);
    }
    // Back from (n, m): the same `step` tells which move led to each point.
    let mut matches = Vec::new();
    let (mut x, mut k) = (n, end_k);
    for d in (1..=depth).rev() {
        let prev = &trace[d as usize - 1];
        let (pk, start) = step(prev, d, k, n, m).expect("a reached point has a predecessor");
        while x > start {
            x -= 1;
            matches.push((x as usize, (x - k) as usize));
        }
        k = pk;
        x = prev[(pk + d - 1) as usize];
    }
    while x > 0 {
        x -= 1;
        matches.push((x as usize, x as usize)); // k == 0 here
    }
    matches.reverse();
    Some(matches)
}

/// The move onto diagonal `k` with `d` edits, from `prev` (step d-1): (previous diagonal, x
/// right after the move). The furthest x wins; only moves inside the edit graph count.
fn step(prev: &[isize], d: isize, k: isize, n: isize, m: isize) -> Option<(isize, isize)> {
    let at = |k: isize| if k.abs() < d { prev[(k + d - 1) as usize] } else { -1 };
    // Down: a line of `b` inserted (x unchanged). Right: a line of `a` deleted (x + 1).
    let down = Some(at(k + 1)).filter(|&x| x >= 0 && x - (k + 1) < m);
    let right = Some(at(k - 1)).filter(|&x| x >= 0 && x < n).map(|x| x + 1);
    match (down, right) {
        (Some(x), Some(r)) if x >= r => Some((k + 1, x)),
        (_, Some(r)) => Some((k - 1, r)),
        (down, None) => down.map(|x| (k + 1, x)),
    }
}

/// Applies an ed script of rred's subset, as strictly as rred reads it (commands from the end
/// towards the start, no overlap, `c`/`d` not on line 0). None when the script is not valid.
pub fn apply_ed(old: &str, script: &str) -> Option<String> {
    if !newline_terminated(old) || !newline_terminated(script) {
        return None;
    }
    let mut lines: Vec<&str> = old.split_terminator('\n').collect();
    let mut cmds = script.split_terminator('\n');
    // Positions doubled: line N is 2N, the gap after it 2N+1; each command lies below the last.
    let mut bound = 2 * lines.len() + 2;
    while let Some(cmd) = cmds.next() {
        let op = *cmd.as_bytes().last()?;
        if !matches!(op, b'a' | b'c' | b'd') {
            return None;
        }
        let range = &cmd[..cmd.len() - 1];
        let (s, e) = match range.split_once(',') {
            Some((s, e)) if op != b'a' => (number(s)?, number(e)?),
            Some(_) => return None,
            None => (number(range)?, number(range)?),
        };
        let (lo, hi) = if op == b'a' { (2 * s + 1, 2 * s + 1) } else { (2 * s, 2 * e) };
        if (op != b'a' && (s == 0 || s > e)) || e > lines.len() || hi >= bound {
            return None;
        }
        bound = lo;
        let mut added = Vec::new();
        if op != b'd' {
            loop {
                match cmds.next()? {
                    "." => break,
                    line => added.push(line),
                }
            }
        }
        let range = if op == b'a' { s..s } else { s - 1..e };
        drop(lines.splice(range, added));
    }
    let mut out = String::with_capacity(old.len() + script.len());
    for line in lines {
        out.push_str(line);
        out.push('\n');
    }
    Some(out)
}

fn number(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The versions of one `Packages` kept between publications, in a private directory: files
/// named by their sha256, and `order.json` (this struct) listing them oldest first.
#[derive(Default, Serialize, Deserialize)]
pub struct History {
    versions: Vec<String>,
}

impl History {
    /// Records `current` as the newest version (moved to the end if it was recorded before)
    /// and returns the older ones, oldest first, read back and checked against their names.
    /// Files are written without fsync: a torn one fails that check and is dropped, and a lost
    /// `order.json` only starts the history again (clients then fetch the whole index once).
    pub fn update(dir: &Path, current: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let order = dir.join("order.json");
        let recorded: History = fs::read(&order).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let sha = sha256_hex(current);
        let older: Vec<&String> = recorded.versions.iter().filter(|v| is_sha(v) && **v != sha).collect();
        let trimmed = &older[older.len().saturating_sub(KEEP - 1)..];
        let path = dir.join(&sha);
        if !fs::read(&path).is_ok_and(|b| b == current) {
            write_unsynced(&path, current).with_context(|| format!("writing {}", path.display()))?;
        }
        let mut out = Vec::new();
        for &v in trimmed {
            if let Ok(bytes) = fs::read(dir.join(v)) {
                if sha256_hex(&bytes) == *v {
                    out.push((v.clone(), bytes));
                }
            }
        }
        let now = History { versions: out.iter().map(|(v, _)| v.clone()).chain([sha]).collect() };
        if now.versions != recorded.versions {
            write_unsynced(&order, &serde_json::to_vec(&now)?)
                .with_context(|| format!("writing {}", order.display()))?;
        }
        // Only after order.json: a crash leaves extra files, never a listed one missing.
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            if let Some(name) = name.to_str().filter(|n| is_sha(n) && !now.versions.iter().any(|v| v == n)) {
                let _ = fs::remove_file(dir.join(name));
            }
        }
        Ok(out)
    }
}

fn is_sha(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// One merged patch: from the History entry `from_sha` straight to the current file.
pub struct Patch {
    pub name: String,
    pub from_sha: String,
    pub from_size: u64,
    pub patch_sha: String,
    pub patch_size: u64,
    pub gz: Vec<u8>,
    pub gz_sha: String,
}

/// A patch from each historical version to `current`, oldest first. Versions that cannot be
/// patched (not UTF-8, an added `.` line) are skipped: those clients fetch the whole index.
/// CPU-bound (a diff and a gzip per version): run it off the async executor.
pub fn make_patches(history: &[(String, Vec<u8>)], current: &[u8]) -> Vec<Patch> {
    let Ok(cur) = std::str::from_utf8(current) else { return Vec::new() };
    let cur_sha = sha256_hex(current);
    history
        .iter()
        .filter_map(|(from_sha, old)| {
            let old = std::str::from_utf8(old).ok().filter(|_| *from_sha != cur_sha)?;
            let script = ed_script(old, cur)?;
            // Defence in depth: a patch that does not give exactly `current` is never published.
            if apply_ed(old, &script).as_deref() != Some(cur) {
                return None;
            }
            // The gzip header carries no time or name, so the same script gives the same bytes.
            let mut enc = GzEncoder::new(Vec::new(), Compression::best());
            enc.write_all(script.as_bytes()).ok()?;
            let gz = enc.finish().ok()?;
            Some(Patch {
                name: format!("T-{}-F-{}", &cur_sha[..16], from_sha.get(..16)?),
                from_sha: from_sha.clone(),
                from_size: old.len() as u64,
                patch_sha: sha256_hex(script.as_bytes()),
                patch_size: script.len() as u64,
                gz_sha: sha256_hex(&gz),
                gz,
            })
        })
        .collect()
}

/// The text of `Packages.diff/Index` (lists in the order of `patches`; with none, only the
/// current hash, so apt falls back to the whole index).
pub fn render_index(current: &[u8], patches: &[Patch]) -> String {
    let mut s = format!("SHA256-Current: {} {}\n", sha256_hex(current), current.len());
    if !patches.is_empty() {
        s.push_str("SHA256-History:\n");
        for p in patches {
            let _ = writeln!(s, " {} {} {}", p.from_sha, p.from_size, p.name);
        }
        s.push_str("SHA256-Patches:\n");
        for p in patches {
            let _ = writeln!(s, " {} {} {}", p.patch_sha, p.patch_size, p.name);
        }
        s.push_str("SHA256-Download:\n");
        for p in patches {
            let _ = writeln!(s, " {} {} {}.gz", p.gz_sha, p.gz.len(), p.name);
        }
    }
    s.push_str("X-Patch-Precedence: merged\n");
    s
}

/// Writes each patch as `diff_dir/NAME.gz` (not flushed: the caller's syncfs before InRelease
/// covers them) and removes `T-*.gz` files no patch names once they are over an hour old.
pub fn write_patches(diff_dir: &Path, patches: &[Patch]) -> Result<()> {
    fs::create_dir_all(diff_dir).with_context(|| format!("creating {}", diff_dir.display()))?;
    for p in patches {
        let path = diff_dir.join(format!("{}.gz", p.name));
        // Rewritten if the bytes differ (only after a compressor change): the Index being
        // published describes these bytes.
        if !fs::read(&path).is_ok_and(|b| b == p.gz) {
            write_unsynced(&path, &p.gz).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let listed: HashSet<String> = patches.iter().map(|p| format!("{}.gz", p.name)).collect();
    // Patches to the version just replaced were listed by the Index until now: their grace
    // starts now, not when they were written (maybe long ago).
    let replaced = patches.last().and_then(|p| p.from_sha.get(..16)).map(|s| format!("T-{s}-"));
    let now = SystemTime::now();
    for entry in fs::read_dir(diff_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("T-") || !name.ends_with(".gz") || listed.contains(name) {
            continue;
        }
        if replaced.as_deref().is_some_and(|r| name.starts_with(r)) {
            let _ = fs::File::options().write(true).open(entry.path()).and_then(|f| f.set_modified(now));
            continue;
        }
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| now.duration_since(t).ok());
        if age.is_some_and(|a| a > GRACE) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn packages(items: &[(&str, &str)]) -> String {
        let sum = "ab".repeat(32);
        let stanza = |(n, v): &(&str, &str)| {
            format!("Package: {n}\nVersion: {v}\nArchitecture: amd64\nFilename: pool/{n}_{v}.deb\nSize: 12\nSHA256: {sum}\n\n")
        };
        items.iter().map(stanza).collect()
    }

    fn round_trip(old: &str, new: &str) -> String {
        let script = ed_script(old, new).expect("expressible");
        assert_eq!(apply_ed(old, &script).as_deref(), Some(new), "{old:?} -> {new:?} via {script:?}");
        script
    }

    #[test]
    fn packages_round_trips() {
        let base = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"].map(|n| (n, "1.0")).to_vec();
        let text = packages(&base);
        let edits: [fn(&mut Vec<(&str, &str)>); 5] = [
            |v| v.insert(5, ("e2", "1.0")),
            |v| {
                v.remove(3);
            },
            |v| v[6].1 = "2.0",
            |v| v.push(("zz", "1.0")),
            |v| v.insert(0, ("0a", "1.0")),
        ];
        for edit in edits {
            let mut new = base.clone();
            edit(&mut new);
            let new = packages(&new);
            assert!(round_trip(&text, &new).lines().count() < 12, "a small change gives a small patch");
            round_trip(&new, &text);
        }
        assert_eq!(ed_script(&text, &text).as_deref(), Some(""));
        assert!(round_trip("", &text).starts_with("0a\n"));
        assert_eq!(round_trip(&text, ""), format!("1,{}d\n", text.lines().count()));
        assert_eq!(round_trip("a\nb\nc\n", "a\nB\nc\nd\n"), "3a\nd\n.\n2c\nB\n.\n");
    }

    #[test]
    fn dot_lines_and_strictness() {
        assert_eq!(ed_script("a\n", "a\n.\n"), None);
        assert_eq!(ed_script("a\nb\n", "a\n.\nb\n"), None);
        round_trip(".\na\n", ".\nb\n"); // an unchanged "." line is fine
        assert_eq!(ed_script("a", "b\n"), None);
        let old = "a\nb\nc\n";
        assert_eq!(apply_ed(old, "3a\nx\n.\n1d\n").as_deref(), Some("b\nc\nx\n"));
        assert_eq!(apply_ed(old, "0a\nx\n.\n").as_deref(), Some("x\na\nb\nc\n"));
        for bad in ["1d\n3d\n", "0d\n", "4d\n", "2c\nx\n", "3,2d\n", "2d\n2d\n", "1,2a\nx\n.\n", "+1d\n", "2x\n"] {
            assert_eq!(apply_ed(old, bad), None, "{bad:?}");
        }
    }

    fn lcs(a: &[&str], b: &[&str]) -> usize {
        let mut t = vec![vec![0; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                t[i][j] = if a[i] == b[j] { t[i + 1][j + 1] + 1 } else { t[i + 1][j].max(t[i][j + 1]) };
            }
        }
        t[0][0]
    }

    /// Lines removed plus lines added by a script.
    fn edit_size(script: &str) -> usize {
        let (mut lines, mut total) = (script.lines(), 0);
        while let Some(cmd) = lines.next() {
            let (range, op) = cmd.split_at(cmd.len() - 1);
            if op != "a" {
                let (s, e) = range.split_once(',').unwrap_or((range, range));
                total += e.parse::<usize>().unwrap() + 1 - s.parse::<usize>().unwrap();
            }
            if op != "d" {
                total += lines.by_ref().take_while(|l| *l != ".").count();
            }
        }
        total
    }

    fn join(lines: &[&str]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn random_round_trips() {
        let words = ["Package: a", "Version: 1", "Version: 2", "", "Architecture: amd64", "x"];
        let mut seed = 42u64; // a tiny LCG
        let mut below = |bound: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize % bound
        };
        for case in 0..200 {
            let old: Vec<&str> = (0..below(14)).map(|_| words[below(6)]).collect();
            let mut new = Vec::new();
            for &line in &old {
                match below(8) {
                    0 => {}
                    1 => new.push(words[below(6)]),
                    2 => new.extend([words[below(6)], line]),
                    _ => new.push(line),
                }
            }
            if case % 5 == 0 {
                new = (0..below(14)).map(|_| words[below(6)]).collect();
            }
            let (old_text, new_text) = (join(&old), join(&new));
            for limit in [MAX_D, 2, 0] {
                let script = script_with_limit(&old_text, &new_text, limit).expect("no '.' lines");
                assert_eq!(apply_ed(&old_text, &script), Some(new_text.clone()), "case {case}: {script:?}");
                if limit == MAX_D {
                    assert_eq!(edit_size(&script), old.len() + new.len() - 2 * lcs(&old, &new), "case {case}: minimal");
                }
            }
        }
    }

    fn shas(h: &[(String, Vec<u8>)]) -> Vec<String> {
        h.iter().map(|(s, _)| s.clone()).collect()
    }

    #[test]
    fn history_records_trims_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let v = |i: usize| format!("Package: p\nVersion: {i}\n").into_bytes();
        assert!(History::update(d, &v(1)).unwrap().is_empty());
        let h = History::update(d, &v(2)).unwrap();
        assert_eq!((shas(&h), &h[0].1), (vec![sha256_hex(&v(1))], &v(1)));
        assert_eq!(shas(&History::update(d, &v(2)).unwrap()), [sha256_hex(&v(1))], "same again: unchanged");
        assert_eq!(shas(&History::update(d, &v(1)).unwrap()), [sha256_hex(&v(2))], "back to v1: moved to the end");
        for i in 3..40 {
            History::update(d, &v(i)).unwrap();
        }
        let h = History::update(d, &v(40)).unwrap();
        assert_eq!(shas(&h), (40 + 1 - KEEP..40).map(|i| sha256_hex(&v(i))).collect::<Vec<_>>());
        let files = fs::read_dir(d).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "order.json").count();
        assert_eq!(files, KEEP);
        // A damaged file (as after a torn write) is dropped, never offered as history.
        fs::write(d.join(sha256_hex(&v(30))), b"garbage").unwrap();
        let h = History::update(d, &v(41)).unwrap();
        assert!(!shas(&h).contains(&sha256_hex(&v(30))));
        assert_eq!(h.len(), KEEP - 2);
    }

    #[test]
    fn patches_index_and_files() {
        let [v1, v2, v3] =
            [[("a", "1"), ("b", "1")], [("a", "1"), ("b", "2")], [("a", "2"), ("b", "2")]].map(|v| packages(&v));
        let history = [&v1, &v2].map(|v| (sha256_hex(v.as_bytes()), v.clone().into_bytes())).to_vec();
        let cur_sha = sha256_hex(v3.as_bytes());
        let patches = make_patches(&history, v3.as_bytes());
        assert_eq!(patches.len(), 2);
        let mut expected =
            [format!("SHA256-Current: {cur_sha} {}\nSHA256-History:\n", v3.len()), String::new(), String::new()];
        for (p, (sha, old)) in patches.iter().zip(&history) {
            assert_eq!(p.name, format!("T-{}-F-{}", &cur_sha[..16], &sha[..16]));
            assert_eq!((p.from_sha.as_str(), p.from_size), (sha.as_str(), old.len() as u64));
            let mut script = String::new();
            flate2::read::GzDecoder::new(&p.gz[..]).read_to_string(&mut script).unwrap();
            assert_eq!((p.patch_sha.clone(), p.patch_size), (sha256_hex(script.as_bytes()), script.len() as u64));
            assert_eq!(p.gz_sha, sha256_hex(&p.gz));
            assert_eq!(apply_ed(std::str::from_utf8(old).unwrap(), &script).as_deref(), Some(v3.as_str()));
            expected[0] += &format!(" {sha} {} {}\n", old.len(), p.name);
            expected[1] += &format!(" {} {} {}\n", p.patch_sha, script.len(), p.name);
            expected[2] += &format!(" {} {} {}.gz\n", p.gz_sha, p.gz.len(), p.name);
        }
        let expected = format!(
            "{}SHA256-Patches:\n{}SHA256-Download:\n{}X-Patch-Precedence: merged\n",
            expected[0], expected[1], expected[2]
        );
        assert_eq!(render_index(v3.as_bytes(), &patches), expected);
        assert_eq!(
            render_index(b"", &[]),
            format!("SHA256-Current: {} 0\nX-Patch-Precedence: merged\n", sha256_hex(b""))
        );

        let dir = tempfile::tempdir().unwrap();
        let file = |name: String, age: u64| {
            let path = dir.path().join(name);
            fs::write(&path, b"x").unwrap();
            let mtime = SystemTime::now() - Duration::from_secs(age);
            fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
            path
        };
        let stale = file("T-0000000000000000-F-1111111111111111.gz".into(), 7200);
        let recent = file("T-2222222222222222-F-3333333333333333.gz".into(), 60);
        let replaced = file(format!("T-{}-F-4444444444444444.gz", &history[1].0[..16]), 7200);
        let other = file("notes.gz".into(), 7200);
        write_patches(dir.path(), &patches).unwrap();
        for p in &patches {
            assert_eq!(fs::read(dir.path().join(format!("{}.gz", p.name))).unwrap(), p.gz);
        }
        assert!(!stale.exists() && recent.exists() && replaced.exists() && other.exists());
        write_patches(dir.path(), &patches[..1]).unwrap();
        assert!(dir.path().join(format!("{}.gz", patches[1].name)).exists(), "unlisted but recent: kept");
    }
}
