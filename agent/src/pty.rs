//! A pseudo-terminal with a user's shell on its far side, for `shell` sessions: the user read
//! from /etc/passwd and /etc/group (no NSS: the agent is linked statically), the shell started
//! as the leader of a session of its own with the terminal as its controlling terminal, and
//! every process of that session ended when the session ends.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

/// A local account as /etc/passwd has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary groups (/etc/group lists the user as a member).
    pub groups: Vec<u32>,
}

impl User {
    pub fn lookup(name: &str) -> io::Result<User> {
        let passwd = std::fs::read_to_string("/etc/passwd")?;
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Self::from_files(name, &passwd, &group)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no user {name:?} in /etc/passwd")))
    }

    fn from_files(name: &str, passwd: &str, group: &str) -> Option<User> {
        let f: Vec<&str> =
            passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.first() == Some(&name))?;
        if f.len() < 7 {
            return None;
        }
        let (uid, gid) = (f[2].parse().ok()?, f[3].parse().ok()?);
        let shell = if f[6].is_empty() { "/bin/sh" } else { f[6] };
        let groups = group
            .lines()
            .filter_map(|l| {
                let g: Vec<&str> = l.split(':').collect();
                let member = g.get(3)?.split(',').any(|m| m == name);
                member.then(|| g.get(2)?.parse().ok()).flatten()
            })
            .collect();
        Some(User { name: name.to_owned(), uid, gid, home: PathBuf::from(f[5]), shell: PathBuf::from(shell), groups })
    }
}

/// The console's side of the terminal (non-blocking, driven by the runtime).
pub struct Pty {
    master: AsyncFd<OwnedFd>,
}

pub struct Spawned {
    pub pty: Pty,
    pub child: tokio::process::Child,
    /// The shell's process id, which is also its session's id.
    pub sid: i32,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// What the session runs.
pub struct Program<'a> {
    pub user: &'a User,
    pub cols: u16,
    pub rows: u16,
    pub term: &'a str,
    /// Run by the user's shell with `-c`; `None`: a login shell.
    pub command: Option<&'a str>,
    /// The terminal's line discipline off (no echo, no CR/LF translation).
    pub raw: bool,
}

pub fn spawn(p: &Program<'_>) -> io::Result<Spawned> {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize { ws_row: p.rows, ws_col: p.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two descriptors into the pointers we pass; the name buffer and
    // termios are optional (null).
    check(unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) })?;
    // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on descriptors we own.
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    }
    if p.raw {
        // SAFETY: termios is plain data, filled by tcgetattr before use.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            check(libc::tcgetattr(slave.as_raw_fd(), &mut t))?;
            libc::cfmakeraw(&mut t);
            check(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t))?;
        }
    }
    let user = p.user;
    let shell_name = user.shell.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "sh".into());
    let mut cmd = tokio::process::Command::new(&user.shell);
    match p.command {
        Some(c) => {
            cmd.arg0(&shell_name).arg("-c").arg(c);
        }
        // A leading '-' in argv[0] is how a shell knows it is a login shell.
        None => {
            cmd.arg0(format!("-{shell_name}"));
        }
    }
    let path = if user.uid == 0 {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    } else {
        "/usr/local/bin:/usr/bin:/bin"
    };
    cmd.env_clear()
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell)
        .env("TERM", p.term)
        .env("PATH", path)
        .env("LANG", "C.UTF-8")
        .current_dir(if user.home.is_dir() { user.home.as_path() } else { std::path::Path::new("/") })
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave))
        .kill_on_drop(false);
    let (uid, gid) = (user.uid, user.gid);
    let groups: Vec<libc::gid_t> = user.groups.clone();
    let become_user = uid != unsafe { libc::geteuid() };
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls, on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::setsid())?;
            // stdin is the terminal: make it the new session's controlling terminal.
            check(libc::ioctl(0, libc::TIOCSCTTY as _, 0))?;
            if become_user {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // Dropping the command closes our copies of the terminal's far side, so reading ends
    // (EIO) once every process there has closed it.
    drop(cmd);
    let sid = child.id().map(|p| p as i32).unwrap_or(0);
    // SAFETY: fcntl on the descriptor we own.
    unsafe {
        let flags = check(libc::fcntl(master.as_raw_fd(), libc::F_GETFL))?;
        check(libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    // SAFETY: the descriptor is owned by the AsyncFd from here on and closed only by it.
    let master = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
    Ok(Spawned { pty: Pty { master }, child, sid })
}

impl Pty {
    /// What the programs wrote; `Ok(0)` once none of them holds the terminal any more.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.master.readable().await?;
            // SAFETY: read into a buffer we own, at most its length.
            match ready.try_io(|fd| {
                check(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) as libc::c_int })
                    .map(|n| n as usize)
            }) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes what the operator typed; returns how much the terminal took.
    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.master.writable().await?;
            // SAFETY: write from a buffer we own, at most its length.
            match ready.try_io(|fd| {
                check(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) as libc::c_int })
                    .map(|n| n as usize)
            }) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub fn resize(&self, cols: u16, rows: u16) {
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer; the kernel then signals the
        // terminal's foreground process group (SIGWINCH).
        unsafe { libc::ioctl(self.master.get_ref().as_raw_fd(), libc::TIOCSWINSZ as _, &size) };
    }
}

/// The processes whose session is `sid` (the shell and everything it started that did not
/// leave the session), from /proc.
pub fn session_members(sid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|s| {
                // After the command's name (which may hold anything): state ppid pgrp session.
                s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(3)?.parse::<i32>().ok())
                    == Some(sid)
            })
        })
        .collect()
}

/// Ends every process of the session: SIGHUP (what a closed terminal sends), then SIGKILL for
/// what is left after `grace`. Reaps the shell.
pub async fn end_session(sid: i32, child: &mut tokio::process::Child, grace: Duration) {
    if sid <= 1 {
        return;
    }
    let signal_all = |sig| {
        for pid in session_members(sid) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, sig) };
        }
    };
    signal_all(libc::SIGHUP);
    signal_all(libc::SIGCONT);
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let shell_gone = matches!(child.try_wait(), Ok(Some(_)) | Err(_));
        if shell_gone && session_members(sid).is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_all(libc::SIGKILL);
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
}

/// At the agent's stop: no time for grace.
pub fn kill_session_now(sid: i32) {
    if sid > 1 {
        for pid in session_members(sid) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_from_the_files() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nkiosk:x:1000:1000:,,,:/home/kiosk:\nbad:x:y:1:::/bin/sh\n";
        let group = "root:x:0:\nvideo:x:44:kiosk,other\nsudo:x:27:notkiosk\nplugdev:x:46:other,kiosk\n";
        let k = User::from_files("kiosk", passwd, group).unwrap();
        assert_eq!((k.uid, k.gid, k.shell.to_str(), k.groups), (1000, 1000, Some("/bin/sh"), vec![44, 46]));
        assert_eq!(User::from_files("root", passwd, group).unwrap().home, PathBuf::from("/root"));
        assert!(User::from_files("bad", passwd, group).is_none());
        assert!(User::from_files("nobody", passwd, group).is_none());
    }

    #[tokio::test]
    async fn a_command_runs_on_a_terminal_and_its_session_is_ended() {
        let user = User::lookup(&std::env::var("USER").unwrap_or_else(|_| "root".into()))
            .or_else(|_| User::lookup("root"))
            .unwrap();
        let program = Program {
            user: &user,
            cols: 100,
            rows: 30,
            term: "xterm",
            command: Some("stty size; tty; sleep 30 & sleep 30"),
            raw: false,
        };
        let mut s = spawn(&program).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains("/dev/pts/") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.pty.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "output ended early: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&out).contains("30 100"), "{}", String::from_utf8_lossy(&out));
        // The shell and its two sleeps (the background one may take a moment to start).
        let started = std::time::Instant::now();
        while session_members(s.sid).len() < 2 {
            assert!(started.elapsed() < Duration::from_secs(5), "{:?}", session_members(s.sid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        end_session(s.sid, &mut s.child, Duration::from_secs(2)).await;
        assert!(session_members(s.sid).is_empty());
    }
}
