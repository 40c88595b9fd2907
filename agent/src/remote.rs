//! Remote sessions' edge: each session a task that seals and opens its frames
//! (`debfleet_protocol::session`), moves the bytes between the broker and a terminal (`pty.rs`)
//! or forwarded TCP connections, keeps the window, and ends on the shell's exit, the console's
//! close or silence, the idle timeout, or the core's order. Frames from the broker come here
//! straight from the loop (`Sessions::deliver`), not through the core.
//!
//! Invariants: what a session holds is bounded by the window both ways (a console that sends
//! past it ends its session); a frame that does not open with the session's key is dropped and
//! counted, never acted on; when a session ends, every process of its terminal's session ends
//! too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use debfleet_protocol::session::{ExitStatus, Frame, KeyPair, Sealer, SessionError, Window, CHUNK, PEER_TIMEOUT_MS};
use debfleet_protocol::{ErrorCode, OpError, OpId, TrafficClass};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::core::sessions::{SessionEvent, SessionKind, SessionOrder};
use crate::core::Out;
use crate::outbox::Outbox;

/// Frames from the console waiting for their session (beyond: dropped, so a flood on a
/// session's topic cannot grow the agent; a genuine frame lost that way ends the session).
const INPUT_QUEUE: usize = 64;

enum Control {
    Frame(Vec<u8>),
    Stop(String),
}

struct Entry {
    topic_in: String,
    tx: mpsc::Sender<Control>,
    /// The terminal's session id, for a stop without grace.
    sid: Arc<Mutex<i32>>,
}

/// The sessions open on this device.
pub struct Sessions {
    open: Mutex<HashMap<OpId, Entry>>,
    outbox: Arc<Outbox>,
    link: Arc<crate::link::Link>,
    events: mpsc::Sender<SessionEvent>,
}

impl Sessions {
    pub fn new(outbox: Arc<Outbox>, link: Arc<crate::link::Link>, events: mpsc::Sender<SessionEvent>) -> Arc<Sessions> {
        Arc::new(Sessions { open: Mutex::new(HashMap::new()), outbox, link, events })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OpId, Entry>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message from the broker: taken when it is on an open session's topic, else handed back.
    pub fn deliver(&self, topic: &str, payload: Vec<u8>) -> Option<Vec<u8>> {
        let open = self.lock();
        let Some(entry) = open.values().find(|e| e.topic_in == topic) else { return Some(payload) };
        if entry.tx.try_send(Control::Frame(payload)).is_err() {
            tracing::warn!("a session's input queue is full; dropping a frame on {topic}");
        }
        None
    }

    pub fn order(self: &Arc<Self>, order: SessionOrder) {
        match order {
            SessionOrder::Open { id, peer_key, kind, idle_timeout_s, budget, topic_in, topic_out } => {
                let (tx, rx) = mpsc::channel(INPUT_QUEUE);
                let sid = Arc::new(Mutex::new(0));
                self.lock().insert(id.clone(), Entry { topic_in, tx, sid: sid.clone() });
                let me = self.clone();
                tokio::spawn(async move {
                    let mut wire = Wire::new(topic_out, me.outbox.clone(), Duration::from_secs(idle_timeout_s));
                    wire.class = kind.class();
                    wire.budget = Some((me.link.clone(), budget));
                    let outcome = run(&me, &id, peer_key, kind, wire, rx, sid).await;
                    me.lock().remove(&id);
                    // A session's buffers (its window's worth of frames, in and out) go back to
                    // the system: the agent at rest is as small after a session as before.
                    #[cfg(target_env = "gnu")]
                    // SAFETY: malloc_trim only returns free memory to the system.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                    let _ = me.events.send(SessionEvent::Ended { id, outcome }).await;
                });
            }
            SessionOrder::Stop { id, reason } => {
                if let Some(e) = self.lock().get(&id) {
                    let _ = e.tx.try_send(Control::Stop(reason));
                }
            }
        }
    }

    /// The agent stops: every terminal's processes end now.
    pub fn kill_all(&self) {
        for e in self.lock().values() {
            crate::pty::kill_session_now(*e.sid.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

fn failed(code: ErrorCode, message: impl Into<String>) -> OpError {
    OpError { code, message: message.into() }
}

async fn run(
    sessions: &Sessions,
    id: &OpId,
    peer_key: [u8; 32],
    kind: SessionKind,
    mut wire: Wire,
    mut rx: mpsc::Receiver<Control>,
    sid: Arc<Mutex<i32>>,
) -> Result<Value, OpError> {
    let pair = KeyPair::generate().map_err(|e| failed(ErrorCode::Internal, e.to_string()))?;
    let key = pair.public();
    wire.sealer =
        Some(pair.agree(&peer_key, id.as_str(), false).map_err(|e| failed(ErrorCode::InvalidValue, e.to_string()))?);
    let ready = SessionEvent::Ready { id: id.clone(), key };
    match kind {
        SessionKind::Shell { user, cols, rows, term, command, raw } => {
            let account = crate::pty::User::lookup(&user)
                .map_err(|e| failed(ErrorCode::Internal, format!("the [remote] user: {e}")))?;
            let program =
                crate::pty::Program { user: &account, cols, rows, term: &term, command: command.as_deref(), raw };
            let spawned = crate::pty::spawn(&program)
                .map_err(|e| failed(ErrorCode::Internal, format!("cannot start {}'s shell: {e}", account.name)))?;
            *sid.lock().unwrap_or_else(|e| e.into_inner()) = spawned.sid;
            let _ = sessions.events.send(ready).await;
            shell(wire, raw, spawned, &mut rx).await
        }
        SessionKind::Forward { to } => {
            let _ = sessions.events.send(ready).await;
            forward(wire, to, &mut rx).await
        }
        SessionKind::Follow { units, since_s, lines } => {
            let mut cmd = tokio::process::Command::from(crate::unitlog::journalctl(&units, since_s, lines, true));
            let child = cmd
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| failed(ErrorCode::NotSupported, format!("cannot run journalctl on this device: {e}")))?;
            let _ = sessions.events.send(ready).await;
            follow(wire, child, &mut rx).await
        }
    }
}

/// One session's side of the wire: sealing, the window both ways, and its clocks.
struct Wire {
    sealer: Option<Sealer>,
    topic: String,
    outbox: Arc<Outbox>,
    window: Window,
    started: Instant,
    /// The console's last frame, and the last data either way.
    heard: Instant,
    active: Instant,
    idle: Duration,
    forged: u64,
    /// What the bytes count as, and the day's budget they must stay within (logs only).
    class: TrafficClass,
    budget: Option<(Arc<crate::link::Link>, u64)>,
}

impl Wire {
    fn new(topic: String, outbox: Arc<Outbox>, idle: Duration) -> Wire {
        let now = Instant::now();
        Wire {
            sealer: None,
            topic,
            outbox,
            window: Window::default(),
            started: now,
            heard: now,
            active: now,
            idle,
            forged: 0,
            class: TrafficClass::Result,
            budget: None,
        }
    }

    fn send(&mut self, frame: &Frame) {
        let Some(sealer) = &mut self.sealer else { return };
        if let Frame::Data { bytes, .. } = frame {
            self.window.sent(bytes.len());
            self.active = Instant::now();
        }
        let out = Out::Publish {
            topic: self.topic.clone(),
            payload: sealer.seal(frame),
            retain: false,
            reliable: true,
            class: self.class,
        };
        self.outbox.lock().push(out, true);
        self.outbox.wake.notify_one();
    }

    /// Whether another chunk may go out now.
    fn room(&self) -> bool {
        self.window.room()
    }

    /// A message from the console: the frame, or `None` when it is to be ignored (not sealed
    /// with this session's key, a duplicate). An error ends the session.
    fn take(&mut self, msg: &[u8]) -> Result<Option<Frame>, OpError> {
        let Some(sealer) = &mut self.sealer else { return Ok(None) };
        match sealer.open(msg) {
            Ok(frame) => {
                self.heard = Instant::now();
                let counted = match &frame {
                    Frame::Ack { consumed } => self.window.acked(*consumed),
                    Frame::Data { bytes, .. } => {
                        self.active = self.heard;
                        self.window.taken(bytes.len())
                    }
                    _ => Ok(()),
                };
                counted
                    .map_err(|why| failed(ErrorCode::InvalidValue, format!("the console broke the protocol: {why}")))?;
                Ok(Some(frame))
            }
            Err(SessionError::Gap { expected, got }) => Err(failed(
                ErrorCode::Interrupted,
                format!("frames {expected} to {} from the console were lost", got - 1),
            )),
            Err(e) => {
                self.forged += 1;
                if self.forged <= 3 || self.forged.is_power_of_two() {
                    tracing::warn!("session {}: ignoring a message ({} so far): {e}", self.topic, self.forged);
                }
                Ok(None)
            }
        }
    }

    fn consumed(&mut self, n: usize) {
        if let Some(ack) = self.window.consumed(n) {
            self.send(&ack);
        }
    }

    fn ack(&mut self) {
        if let Some(ack) = self.window.ack() {
            self.send(&ack);
        }
    }

    /// Checked on every tick: acknowledge what waits, and end a session whose console went
    /// silent or that sat idle.
    fn tick(&mut self) -> Result<(), OpError> {
        self.ack();
        if self.heard.elapsed() > Duration::from_millis(PEER_TIMEOUT_MS) {
            return Err(failed(
                ErrorCode::Timeout,
                format!(
                    "the console sent nothing for {} s (stopped, or lost its connection); the session was ended",
                    PEER_TIMEOUT_MS / 1000
                ),
            ));
        }
        if self.active.elapsed() > self.idle {
            return Err(failed(
                ErrorCode::Timeout,
                format!("idle for {} s ([remote] idle_timeout_s)", self.idle.as_secs()),
            ));
        }
        Ok(())
    }

    /// A metered link's budget has no room left for this session's class.
    fn over_budget(&self) -> bool {
        self.budget.as_ref().is_some_and(|(link, bytes)| !link.allows(self.class, *bytes))
    }

    fn figures(&self) -> Value {
        json!({
            "duration_s": self.started.elapsed().as_secs(),
            "bytes_in": self.window.bytes_in(),
            "bytes_out": self.window.bytes_out(),
        })
    }
}

/// How a session ended: its result, or why it failed.
type Ended = Result<Value, OpError>;

impl Wire {
    /// What came on the session's control channel: a frame for the session to act on (`None`:
    /// nothing to do), or the session's end — the console's close, the core's stop, a broken
    /// protocol — the same for every kind of session.
    fn control(&mut self, control: Option<Control>) -> Result<Option<Frame>, Ended> {
        match control {
            Some(Control::Frame(m)) => match self.take(&m) {
                Ok(Some(Frame::Close { reason })) => Err(Ok(ended_by_console(self, &reason))),
                Ok(frame) => Ok(frame),
                Err(e) => Err(Err(e)),
            },
            Some(Control::Stop(reason)) => Err(Err(failed(ErrorCode::Interrupted, reason))),
            None => Err(Err(failed(ErrorCode::Internal, "the session lost its input"))),
        }
    }
}

fn ended_by_console(wire: &Wire, reason: &str) -> Value {
    let mut v = wire.figures();
    v["closed_by_console"] = Value::String(reason.to_owned());
    v
}

async fn shell(
    mut wire: Wire,
    raw: bool,
    spawned: crate::pty::Spawned,
    rx: &mut mpsc::Receiver<Control>,
) -> Result<Value, OpError> {
    let crate::pty::Spawned { pty, mut child, sid } = spawned;
    let pty = Arc::new(pty);
    // The terminal's output, a chunk at a time (`None`: every program closed it).
    let (out_tx, mut out_rx) = mpsc::channel::<Option<Vec<u8>>>(2);
    let reader = {
        let pty = pty.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let chunk = match pty.read(&mut buf).await {
                    Ok(0) | Err(_) => None,
                    Ok(n) => Some(buf[..n].to_vec()),
                };
                let end = chunk.is_none();
                if out_tx.send(chunk).await.is_err() || end {
                    return;
                }
            }
        })
    };
    // What the operator typed, written as the terminal takes it; `written` counts it.
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (written_tx, mut written) = mpsc::unbounded_channel::<usize>();
    let writer = {
        let pty = pty.clone();
        tokio::spawn(async move {
            while let Some(bytes) = in_rx.recv().await {
                let mut at = 0;
                while at < bytes.len() {
                    match pty.write(&bytes[at..]).await {
                        Ok(n) => at += n,
                        Err(_) => break,
                    }
                }
                if written_tx.send(bytes.len()).is_err() {
                    return;
                }
            }
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut exit: Option<ExitStatus> = None;
    let mut output_done = false;
    let mut last_output = Instant::now();
    let outcome = loop {
        if let Some(status) = exit {
            // The shell is gone: what it wrote goes out first; a program it left holding the
            // terminal gets two quiet seconds.
            if output_done || last_output.elapsed() > Duration::from_secs(2) {
                wire.ack();
                wire.send(&Frame::Exit(status));
                let mut v = wire.figures();
                v["exit"] = match status {
                    ExitStatus::Code(c) => json!({ "code": c }),
                    ExitStatus::Signal(s) => json!({ "signal": s }),
                };
                break Ok(v);
            }
        }
        tokio::select! {
            chunk = out_rx.recv(), if wire.room() && !output_done => match chunk {
                Some(Some(bytes)) => {
                    last_output = Instant::now();
                    wire.send(&Frame::Data { stream: 0, bytes });
                }
                _ => output_done = true,
            },
            control = rx.recv() => match wire.control(control) {
                Ok(Some(Frame::Data { stream: 0, bytes })) => {
                    if exit.is_some() {
                        wire.consumed(bytes.len());
                    } else {
                        let _ = in_tx.send(bytes);
                    }
                }
                Ok(Some(Frame::Resize { cols, rows })) if cols > 0 && rows > 0 => pty.resize(cols, rows),
                // The console's input ended: on a terminal with its line discipline on,
                // that is end-of-file (^D); a raw one has no such thing.
                Ok(Some(Frame::Eof { stream: 0, .. })) if !raw && exit.is_none() => {
                    let _ = in_tx.send(vec![4]);
                }
                Ok(_) => {}
                Err(end) => break end,
            },
            Some(n) = written.recv() => wire.consumed(n),
            status = child.wait(), if exit.is_none() => {
                use std::os::unix::process::ExitStatusExt;
                exit = Some(match status {
                    Ok(s) => match (s.code(), s.signal()) {
                        (Some(c), _) => ExitStatus::Code(c),
                        (None, Some(sig)) => ExitStatus::Signal(sig),
                        (None, None) => ExitStatus::Code(-1),
                    },
                    Err(_) => ExitStatus::Code(-1),
                });
                last_output = Instant::now();
            }
            _ = tick.tick() => {
                if let Err(e) = wire.tick() {
                    break Err(e);
                }
            }
        }
    };
    if let Err(e) = &outcome {
        wire.send(&Frame::Close { reason: e.message.clone() });
    }
    reader.abort();
    writer.abort();
    crate::pty::end_session(sid, &mut child, Duration::from_secs(2)).await;
    outcome
}

/// A followed journal: journalctl's JSON lines as entries, one per line, batched into frames.
async fn follow(
    mut wire: Wire,
    mut child: tokio::process::Child,
    rx: &mut mpsc::Receiver<Control>,
) -> Result<Value, OpError> {
    let Some(mut stdout) = child.stdout.take() else {
        return Err(failed(ErrorCode::Internal, "journalctl has no output"));
    };
    // A line longer than this (journalctl's JSON of a huge message) is skipped.
    const MAX_LINE: usize = 1 << 20;
    let mut pending: Vec<u8> = Vec::new();
    let mut batch: Vec<u8> = Vec::new();
    let mut entries = 0u64;
    let mut skipping = false;
    let mut buf = vec![0u8; CHUNK];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let outcome = loop {
        tokio::select! {
            n = stdout.read(&mut buf), if wire.room() && batch.len() < CHUNK / 2 => match n {
                Ok(0) | Err(_) => break Err(failed(ErrorCode::Internal, "journalctl stopped")),
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        if std::mem::take(&mut skipping) {
                            continue;
                        }
                        if let Some(e) = crate::unitlog::entry(&line) {
                            batch.extend_from_slice(e.to_string().as_bytes());
                            batch.push(b'\n');
                            entries += 1;
                        }
                    }
                    if pending.len() > MAX_LINE {
                        pending.clear();
                        skipping = true;
                    }
                }
            },
            control = rx.recv() => {
                if let Err(end) = wire.control(control) {
                    break end;
                }
            }
            _ = tick.tick() => {
                if !batch.is_empty() {
                    if wire.over_budget() {
                        break Err(failed(ErrorCode::Busy, "today's data budget has no room left for logs"));
                    }
                    // Whole entries per frame: a batch stays under a chunk (entries are cut to
                    // 2,000 characters, so one is far smaller).
                    while !batch.is_empty() {
                        let cut = if batch.len() <= CHUNK {
                            batch.len()
                        } else {
                            batch[..CHUNK].iter().rposition(|&b| b == b'\n').map_or(CHUNK, |i| i + 1)
                        };
                        let bytes: Vec<u8> = batch.drain(..cut).collect();
                        wire.send(&Frame::Data { stream: 0, bytes });
                    }
                }
                // Following is activity enough: a quiet unit does not end the session as idle.
                wire.active = Instant::now();
                if let Err(e) = wire.tick() {
                    break Err(e);
                }
            }
        }
    };
    if let Err(e) = &outcome {
        wire.send(&Frame::Close { reason: e.message.clone() });
    }
    // journalctl ends with the session: following costs nothing afterwards.
    let _ = child.kill().await;
    outcome.map(|mut v| {
        v["entries"] = entries.into();
        v
    })
}

/// A read from one forwarded connection: bytes, or its end (with the error that ended it).
enum Read {
    Bytes(u32, Vec<u8>),
    End(u32, Option<String>),
}

async fn forward(mut wire: Wire, to: String, rx: &mut mpsc::Receiver<Control>) -> Result<Value, OpError> {
    let (read_tx, mut reads) = mpsc::channel::<Read>(4);
    let (written_tx, mut written) = mpsc::unbounded_channel::<usize>();
    let mut streams: HashMap<u32, mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut connections = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let outcome = loop {
        tokio::select! {
            read = reads.recv(), if wire.room() => match read {
                Some(Read::Bytes(stream, bytes)) => wire.send(&Frame::Data { stream, bytes }),
                Some(Read::End(stream, error)) => {
                    streams.remove(&stream);
                    wire.send(&Frame::Eof { stream, error });
                }
                None => break Err(failed(ErrorCode::Internal, "the session lost its connections")),
            },
            control = rx.recv() => match wire.control(control) {
                    Ok(Some(Frame::Open { stream })) => {
                        if streams.len() >= debfleet_protocol::session::MAX_STREAMS || streams.contains_key(&stream) {
                            let error = format!("at most {} connections at once", debfleet_protocol::session::MAX_STREAMS);
                            wire.send(&Frame::Eof { stream, error: Some(error) });
                            continue;
                        }
                        connections += 1;
                        tasks.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                        let (tx, input) = mpsc::unbounded_channel();
                        streams.insert(stream, tx);
                        tasks.push(tokio::spawn(connection(stream, to.clone(), input, read_tx.clone(), written_tx.clone())));
                    }
                    Ok(Some(Frame::Data { stream, bytes })) => {
                        let n = bytes.len();
                        // Bytes for a connection that has ended are consumed by dropping them.
                        if streams.get(&stream).is_none_or(|tx| tx.send(bytes).is_err()) {
                            wire.consumed(n);
                        }
                    }
                    // The console's side closed: the device's side gets EOF once the bytes before it are written.
                    Ok(Some(Frame::Eof { stream, .. })) => {
                        streams.remove(&stream);
                    }
                    Ok(_) => {}
                    Err(end) => break end,
            },
            Some(n) = written.recv() => wire.consumed(n),
            _ = tick.tick() => {
                if let Err(e) = wire.tick() {
                    break Err(e);
                }
            }
        }
    };
    if let Err(e) = &outcome {
        wire.send(&Frame::Close { reason: e.message.clone() });
    }
    for t in tasks {
        t.abort();
    }
    outcome.map(|mut v| {
        v["connections"] = connections.into();
        v
    })
}

/// One forwarded connection: connect, then copy both ways until both sides are done.
async fn connection(
    stream: u32,
    to: String,
    mut input: mpsc::UnboundedReceiver<Vec<u8>>,
    reads: mpsc::Sender<Read>,
    written: mpsc::UnboundedSender<usize>,
) {
    let conn = match tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(&to)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return refuse(stream, format!("connecting to {to}: {e}"), input, reads, written).await,
        Err(_) => return refuse(stream, format!("connecting to {to}: no answer in 10 s"), input, reads, written).await,
    };
    let (mut r, mut w) = conn.into_split();
    let reading = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => {
                    let _ = reads.send(Read::End(stream, None)).await;
                    return;
                }
                Ok(n) => {
                    if reads.send(Read::Bytes(stream, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = reads.send(Read::End(stream, Some(e.to_string()))).await;
                    return;
                }
            }
        }
    };
    let writing = async {
        let mut ok = true;
        while let Some(bytes) = input.recv().await {
            ok = ok && w.write_all(&bytes).await.is_ok();
            let _ = written.send(bytes.len());
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reading, writing);
}

async fn refuse(
    stream: u32,
    error: String,
    mut input: mpsc::UnboundedReceiver<Vec<u8>>,
    reads: mpsc::Sender<Read>,
    written: mpsc::UnboundedSender<usize>,
) {
    let _ = reads.send(Read::End(stream, Some(error))).await;
    // What the console sent meanwhile is consumed by dropping it (its window stays right).
    while let Some(bytes) = input.recv().await {
        let _ = written.send(bytes.len());
    }
}
