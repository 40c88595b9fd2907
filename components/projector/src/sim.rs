//! A simulated Optoma projector on a pseudo-terminal pair, for tests and the lab: it answers
//! commands as the real one does (`P`, `F`, `OKn`, `INFOn` reports), keeps its state, and can be
//! made silent, noisy, unplugged and plugged in again. The component opens `link`, a symbolic
//! link to the pty's slave side, as it would open `/dev/ttyUSB0`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the simulated projector is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimState {
    pub power: bool,
    pub input: u32,
    pub aspect: u32,
    pub keystone: i32,
    /// Every command line it received, in order.
    pub received: Vec<String>,
    /// Answers nothing.
    pub silent: bool,
    /// Puts line noise before every answer.
    pub noisy: bool,
}

pub struct SimProjector {
    link: PathBuf,
    pub state: Arc<Mutex<SimState>>,
    plugged: Option<(Arc<AtomicBool>, JoinHandle<()>, OwnedFd)>,
}

fn openpty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the given ints; the rest may be null.
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors this function owns from here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // Anyone may open it: the component runs as a user of its own (a real adapter's group is
    // `dialout`; a simulator's pty needs no protection).
    // SAFETY: a valid descriptor.
    unsafe {
        libc::fchmod(slave.as_raw_fd(), 0o666);
    }
    // Raw: no echo, no line editing, no CR/LF translation — a serial line carries bytes.
    // SAFETY: a valid descriptor and a termios filled in by tcgetattr before use.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    Ok((master, slave))
}

impl SimProjector {
    /// A projector plugged in at `link`.
    pub fn start(link: &Path) -> SimProjector {
        let mut sim = SimProjector {
            link: link.to_owned(),
            state: Arc::new(Mutex::new(SimState { input: 1, aspect: 2, ..Default::default() })),
            plugged: None,
        };
        sim.plug();
        sim
    }

    /// Plugs it in (again): a new pty behind the same link.
    pub fn plug(&mut self) {
        self.unplug();
        let (master, slave) = openpty().expect("openpty");
        let name = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd())).expect("the pty's name");
        let _ = std::fs::remove_file(&self.link);
        std::os::unix::fs::symlink(&name, &self.link).expect("linking the pty");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, state) = (stop.clone(), self.state.clone());
        let thread = std::thread::spawn(move || serve(master, state, s));
        // The slave side stays open here too, so the master never sees a hang-up between the
        // component's reopenings.
        self.plugged = Some((stop, thread, slave));
    }

    /// Unplugs it: the pty goes away (the component's reads fail) and so does the link.
    pub fn unplug(&mut self) {
        if let Some((stop, thread, slave)) = self.plugged.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
            drop(slave);
        }
        let _ = std::fs::remove_file(&self.link);
    }

    pub fn set(&self, f: impl FnOnce(&mut SimState)) {
        f(&mut self.state.lock().unwrap());
    }

    pub fn get(&self) -> SimState {
        self.state.lock().unwrap().clone()
    }
}

impl Drop for SimProjector {
    fn drop(&mut self) {
        self.unplug();
    }
}

fn write_all(fd: &OwnedFd, bytes: &[u8]) {
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: a valid descriptor and a slice that outlives the call.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes[off..].as_ptr().cast(), bytes.len() - off) };
        if n <= 0 {
            return;
        }
        off += n as usize;
    }
}

/// Reads command lines from the master side and answers them until told to stop; the master
/// closes when it returns (an unplugged adapter).
fn serve(master: OwnedFd, state: Arc<Mutex<SimState>>, stop: Arc<AtomicBool>) {
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd { fd: master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 50) };
        if ready <= 0 || pfd.revents & libc::POLLIN == 0 {
            if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            continue;
        }
        // SAFETY: reading into a buffer of the given length.
        let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        for &b in &buf[..n as usize] {
            if b != b'\r' {
                line.push(b);
                continue;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            line.clear();
            let answer = {
                let mut s = state.lock().unwrap();
                s.received.push(text.clone());
                let answer = answer(&mut s, &text);
                if s.silent {
                    None
                } else if s.noisy {
                    Some([b"\x00\xff#!~\r".as_slice(), &answer].concat())
                } else {
                    Some(answer)
                }
            };
            if let Some(a) = answer {
                write_all(&master, &a);
            }
        }
    }
}

/// Optoma's answer to one command line (`~IICC n`).
fn answer(s: &mut SimState, text: &str) -> Vec<u8> {
    let Some(rest) = text.strip_prefix('~') else { return b"F\r".to_vec() };
    let Some((addr, value)) = rest.split_once(' ') else { return b"F\r".to_vec() };
    if addr.len() < 4 || !addr.is_ascii() {
        return b"F\r".to_vec();
    }
    let (_id, code) = addr.split_at(2);
    let n: Option<i64> = value.trim().parse().ok();
    let ok = |s: &mut SimState, f: &dyn Fn(&mut SimState)| {
        f(s);
        b"P\r".to_vec()
    };
    match (code, n) {
        ("00", Some(1)) => {
            s.power = true;
            // Acknowledged, then it reports warming up, as the real one does.
            b"P\rINFO1\r".to_vec()
        }
        ("00", Some(0)) => {
            s.power = false;
            b"P\rINFO2\r".to_vec()
        }
        ("12", Some(v @ (1 | 5 | 10 | 15))) => ok(s, &|s| s.input = v as u32),
        // The aspect ratio changes only while it is on.
        ("60", Some(v @ (1 | 2 | 3 | 5 | 7))) if s.power => ok(s, &|s| s.aspect = v as u32),
        ("66", Some(v)) if (-40..=40).contains(&v) => ok(s, &|s| s.keystone = v as i32),
        ("63" | "64", Some(v)) if (-100..=100).contains(&v) => b"P\r".to_vec(),
        ("140", Some(_)) => b"P\r".to_vec(),
        ("124", Some(1)) => format!("Ok{}\r", u8::from(s.power)).into_bytes(),
        ("121", Some(1)) => format!("Ok{}\r", s.input).into_bytes(),
        _ => b"F\r".to_vec(),
    }
}
