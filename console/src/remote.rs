//! `debfleet shell` and `debfleet forward`: remote sessions from the console's side. Opens the
//! session with a `shell`/`forward` command carrying a fresh session key, takes the device's key
//! from the operation's running record, then moves sealed frames (`debfleet_protocol::session`)
//! between the session's topics and the terminal or local TCP connections, under the window.
//! A session never outlives this connection to the broker: losing it ends the session.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use debfleet_protocol::session::{
    Direction, ExitStatus, Frame, KeyPair, Sealer, SessionError, Window, CHUNK, KEEPALIVE_MS,
};
use debfleet_protocol::signature::SignTarget;
use debfleet_protocol::{Command, CommandArgs, DeviceId, OpId, OpRecord, OpState, Topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::cmds::usage;
use crate::session::{Session, Unreachable};
use crate::Ctx;

/// An open session: the connection, the sealing state, the topics, and the window.
pub(crate) struct Open {
    session: Session,
    sealer: Sealer,
    topic_in: String,
    topic_out: String,
    op_topic: String,
    /// Frames that came before the device's key (nothing orders them after its record).
    early: std::collections::VecDeque<Vec<u8>>,
    window: Window,
    last_sent: Instant,
}

/// What came from the device.
enum Incoming {
    Frame(Frame),
    /// The operation ended (or failed before the session began).
    Ended(OpRecord),
    Nothing,
}

impl Open {
    async fn send(&mut self, frame: &Frame) -> Result<()> {
        if let Frame::Data { bytes, .. } = frame {
            self.window.sent(bytes.len());
        }
        self.last_sent = Instant::now();
        self.session.publish(self.topic_in.clone(), self.sealer.seal(frame), false).await
    }

    fn room(&self) -> bool {
        self.window.room()
    }

    async fn consumed(&mut self, n: usize) -> Result<()> {
        match self.window.consumed(n) {
            Some(ack) => self.send(&ack).await,
            None => Ok(()),
        }
    }

    async fn ack(&mut self) -> Result<()> {
        match self.window.ack() {
            Some(ack) => self.send(&ack).await,
            None => Ok(()),
        }
    }

    /// The keepalive, and acknowledgements that waited.
    async fn tick(&mut self) -> Result<()> {
        self.ack().await?;
        if self.last_sent.elapsed() >= Duration::from_millis(KEEPALIVE_MS) {
            self.send(&Frame::Ping).await?;
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Incoming> {
        let m = match self.early.pop_front() {
            Some(payload) => crate::session::Message { topic: self.topic_out.clone(), payload, retained: false },
            None => self.session.recv().await.map_err(|e| match e.downcast::<Unreachable>() {
                Ok(u) => anyhow!(Unreachable(format!("{}; the session ended with it", u.0))),
                Err(e) => e,
            })?,
        };
        if m.topic == self.topic_out {
            return Ok(match self.sealer.open(&m.payload) {
                Ok(Frame::Ack { consumed }) => {
                    self.window.acked(consumed).map_err(|why| anyhow!("the session broke: {why}"))?;
                    Incoming::Nothing
                }
                Ok(Frame::Data { stream, bytes }) => {
                    self.window.taken(bytes.len()).map_err(|why| anyhow!("the session broke: {why}"))?;
                    Incoming::Frame(Frame::Data { stream, bytes })
                }
                Ok(f) => Incoming::Frame(f),
                Err(e @ SessionError::Gap { .. }) => bail!("the session broke: {e}"),
                // Not sealed with this session's key: someone else wrote it. Ignored.
                Err(_) => Incoming::Nothing,
            });
        }
        if m.topic == self.op_topic && !m.payload.is_empty() {
            if let Ok(r) = serde_json::from_slice::<OpRecord>(&m.payload) {
                if r.state.is_final() {
                    return Ok(Incoming::Ended(r));
                }
            }
        }
        Ok(Incoming::Nothing)
    }
}

fn why(r: &OpRecord) -> String {
    match &r.error {
        Some(e) => format!("{} ({})", e.message, e.code.as_str()),
        None => format!("the operation ended {}", r.state.as_str()),
    }
}

/// Sends the opening command and waits for the device's key.
pub(crate) async fn open(ctx: &Ctx, device: &DeviceId, args: impl FnOnce([u8; 32]) -> CommandArgs) -> Result<Open> {
    let mut session = Session::connect(ctx.connect_options()).await?;
    let pair = KeyPair::generate().map_err(|e| anyhow!("{e}"))?;
    let args = args(pair.public());
    let verb = args.verb();
    let id: OpId = crate::request::new_op_id(verb.as_str());
    let t = &ctx.topics;
    let topic_in = t.name(&Topic::Session(device.clone(), id.clone(), Direction::In));
    let topic_out = t.name(&Topic::Session(device.clone(), id.clone(), Direction::Out));
    let op_topic = t.name(&Topic::Op(device.clone(), id.clone()));
    let status_topic = t.name(&Topic::Status(device.clone()));
    session.subscribe(&[topic_out.clone(), op_topic.clone(), status_topic.clone()]).await?;
    // The device's retained status says whether it is there at all.
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = session.recv().await?;
            if m.topic == status_topic {
                return Ok::<_, anyhow::Error>(serde_json::from_slice::<debfleet_protocol::Status>(&m.payload).ok());
            }
        }
    })
    .await;
    match status {
        Ok(Ok(Some(s))) if s.state == debfleet_protocol::Liveness::Online => {}
        Ok(Ok(Some(s))) => bail!("{device} is {} (since {})", s.state.as_str(), s.since),
        Ok(Err(e)) => return Err(e),
        _ => bail!("no device {device} is known to the broker"),
    }
    let life = Duration::from_secs(60);
    let command = Command {
        id: id.clone(),
        verb,
        args,
        expires_at: Some(debfleet_protocol::time::now_unix_ms() + life.as_millis() as i64),
        by: ctx.by.clone(),
        signature: None,
    };
    let payload = session.command_payload(&command, &SignTarget::Device(device.clone()));
    let cmd_topic = t.name(&Topic::DeviceCmd(device.clone(), verb.as_str().to_owned()));
    session.publish_command(cmd_topic, payload, life.as_secs() as u32).await?;
    let mut early = std::collections::VecDeque::new();
    let key = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = session.recv().await?;
            if m.topic == topic_out && early.len() < 64 {
                early.push_back(m.payload);
                continue;
            }
            if m.topic != op_topic || m.payload.is_empty() {
                continue;
            }
            let Ok(r) = serde_json::from_slice::<OpRecord>(&m.payload) else { continue };
            if r.state.is_final() {
                bail!("{device} did not open the session: {}", why(&r));
            }
            let key = r.result.as_ref().and_then(|v| v["session"]["key"].as_str().map(str::to_owned));
            if let (OpState::Running, Some(k)) = (r.state, key) {
                return debfleet_protocol::signature::from_hex::<32>(&k).context("the device's session key");
            }
        }
    })
    .await
    .map_err(|_| anyhow!("{device} did not answer within 20 s"))??;
    let sealer = pair.agree(&key, id.as_str(), true).map_err(|e| anyhow!("{e}"))?;
    Ok(Open {
        session,
        sealer,
        topic_in,
        topic_out,
        op_topic,
        early,
        window: Window::default(),
        last_sent: Instant::now(),
    })
}

/// The local terminal in raw mode while the session runs, as it was afterwards.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        // SAFETY: termios is plain data filled by tcgetattr; the fd is our stdin.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Some(RawMode(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: puts back the settings read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

fn window_size() -> (u16, u16) {
    // SAFETY: TIOCGWINSZ fills one winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        for fd in [1, 0, 2] {
            if libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
                return (ws.ws_col, ws.ws_row);
            }
        }
    }
    (80, 24)
}

/// `debfleet shell DEVICE [-- COMMAND...]`. Returns the remote program's exit status (128 +
/// the signal when a signal ended it).
pub async fn shell(ctx: &Ctx, device: &str, command: Vec<String>) -> Result<u8> {
    let device = DeviceId::new(device).map_err(|e| usage(e.to_string()))?;
    let tty = is_tty(0);
    let command = (!command.is_empty()).then(|| command.join(" "));
    // A command whose input is not a terminal gets a raw terminal: its output arrives byte for
    // byte (for scripts and pipes).
    let raw = !tty && command.is_some();
    let (cols, rows) = window_size();
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| !t.is_empty() && t.len() <= 64)
        .unwrap_or_else(|| "xterm-256color".into());
    let mut s = open(ctx, &device, |key| CommandArgs::Shell { key, cols, rows, term, command, raw }).await?;
    let _raw_mode = if tty { RawMode::enter() } else { None };
    if tty {
        eprint!("[debfleet: shell on {device}; ~. at the start of a line ends it]\r\n");
    }
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut stdin = stdin_reader();
    let mut stdout = std::io::stdout();
    let mut input_open = true;
    // `~.` after a newline (or at the start) ends the session, as in ssh.
    let mut line_start = true;
    let mut tilde = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // The operation's end can overtake the last frames (another topic): its exit status is
    // used if the Exit frame does not follow within two seconds.
    let mut finishing: Option<(Instant, u8)> = None;
    loop {
        if let Some((since, code)) = finishing {
            if since.elapsed() > Duration::from_secs(2) {
                return Ok(code);
            }
        }
        tokio::select! {
            chunk = stdin.recv(), if input_open && s.room() => {
                let Some(chunk) = chunk else {
                    input_open = false;
                    s.send(&Frame::Eof { stream: 0, error: None }).await?;
                    continue;
                };
                let mut bytes = Vec::with_capacity(chunk.len());
                for &b in &chunk {
                    if tty && tilde && b == b'.' {
                        s.send(&Frame::Close { reason: "~. typed".into() }).await?;
                        eprint!("\r\n[debfleet: session closed]\r\n");
                        return Ok(0);
                    }
                    if tty && tilde && b != b'~' {
                        bytes.push(b'~');
                    }
                    tilde = tty && line_start && b == b'~' && !tilde;
                    if !tilde {
                        bytes.push(b);
                    }
                    line_start = b == b'\r' || b == b'\n';
                }
                if !bytes.is_empty() {
                    s.send(&Frame::Data { stream: 0, bytes }).await?;
                }
            }
            incoming = s.recv() => match incoming? {
                Incoming::Frame(Frame::Data { bytes, .. }) => {
                    {
                        use std::io::Write;
                        stdout.write_all(&bytes)?;
                        stdout.flush()?;
                    }
                    s.consumed(bytes.len()).await?;
                }
                Incoming::Frame(Frame::Exit(status)) => {
                    return Ok(match status {
                        ExitStatus::Code(c) => c.clamp(0, 255) as u8,
                        ExitStatus::Signal(sig) => (128 + sig).clamp(0, 255) as u8,
                    });
                }
                Incoming::Frame(Frame::Close { reason }) => bail!("{device} ended the session: {reason}"),
                Incoming::Ended(r) => match exit_of(&r) {
                    Some(code) => finishing = finishing.or(Some((Instant::now(), code))),
                    None => bail!("{device} ended the session: {}", why(&r)),
                },
                _ => {}
            },
            _ = winch.recv() => {
                let (cols, rows) = window_size();
                s.send(&Frame::Resize { cols, rows }).await?;
            }
            _ = interrupt.recv() => {
                s.send(&Frame::Close { reason: "interrupted".into() }).await?;
                return Ok(130);
            }
            _ = tick.tick() => s.tick().await?,
        }
    }
}

/// The exit status a finished shell operation records, as the console's own.
fn exit_of(r: &OpRecord) -> Option<u8> {
    let exit = &r.result.as_ref()?["exit"];
    if let Some(c) = exit["code"].as_i64() {
        return Some(c.clamp(0, 255) as u8);
    }
    exit["signal"].as_i64().map(|s| (128 + s).clamp(0, 255) as u8)
}

/// A terminal in the web console: the page's keystrokes and resizes to the device, the
/// device's output to the page, until either ends (a page gone closes the session).
pub(crate) async fn pump_terminal(
    mut s: Open,
    mut input: mpsc::Receiver<debfleet_web::terminal::TermIn>,
    output: mpsc::Sender<debfleet_web::terminal::TermOut>,
) {
    use debfleet_web::terminal::{TermIn, TermOut};
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let end = loop {
        tokio::select! {
            i = input.recv(), if s.room() => match i {
                Some(TermIn::Data(bytes)) => {
                    if s.send(&Frame::Data { stream: 0, bytes }).await.is_err() {
                        break "the connection to the broker was lost".to_owned();
                    }
                }
                Some(TermIn::Resize(cols, rows)) => {
                    let _ = s.send(&Frame::Resize { cols, rows }).await;
                }
                Some(TermIn::Close) | None => {
                    let _ = s.send(&Frame::Close { reason: "the web page was closed".into() }).await;
                    break "closed".to_owned();
                }
            },
            incoming = s.recv() => match incoming {
                Ok(Incoming::Frame(Frame::Data { bytes, .. })) => {
                    let n = bytes.len();
                    // A page that stopped reading (or never opened its stream) ends the session.
                    let sent = tokio::time::timeout(Duration::from_secs(30), output.send(TermOut::Data(bytes))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        let _ = s.send(&Frame::Close { reason: "the web page was closed".into() }).await;
                        break "closed".to_owned();
                    }
                    let _ = s.consumed(n).await;
                }
                Ok(Incoming::Frame(Frame::Exit(ExitStatus::Code(c)))) => break format!("exited with status {c}"),
                Ok(Incoming::Frame(Frame::Exit(ExitStatus::Signal(n)))) => break format!("ended by signal {n}"),
                Ok(Incoming::Frame(Frame::Close { reason })) => break format!("the device ended the session: {reason}"),
                Ok(Incoming::Ended(r)) => break match exit_of(&r) {
                    Some(c) => format!("exited with status {c}"),
                    None => format!("the device ended the session: {}", why(&r)),
                },
                Ok(_) => {}
                Err(e) => break format!("{e:#}"),
            },
            _ = tick.tick() => {
                if s.tick().await.is_err() {
                    break "the connection to the broker was lost".to_owned();
                }
            }
        }
    };
    let _ = output.send(TermOut::End(end)).await;
    s.session.disconnect().await;
}

/// The console's stdin, a chunk at a time, read by a thread of its own: a blocked read there
/// must not keep the process from ending when the session does (tokio's stdin would).
fn stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(2);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    rx
}

/// `debfleet logs ... --follow`: each device's journal entries as they come, labelled by device,
/// until Ctrl-C or `duration`. Every device's session ends (and its journalctl with it) when
/// this does.
pub async fn follow_logs(
    ctx: &Ctx,
    devices: Vec<DeviceId>,
    unit: Option<String>,
    since_s: Option<u64>,
    lines: u32,
    duration: Option<Duration>,
    json: bool,
) -> Result<u8> {
    let (tx, mut rx) = mpsc::channel::<(DeviceId, Result<serde_json::Value, String>)>(256);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    // A device that could not be followed makes the exit status 1, as one that fails later does.
    let mut failed = false;
    for device in devices {
        let (tx, mut stop) = (tx.clone(), stop.clone());
        let unit = unit.clone();
        let mut s =
            match open(ctx, &device, |key| CommandArgs::Journal { unit, since_s, lines, follow: Some(key) }).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("debfleet: {device}: {e:#}");
                    failed = true;
                    continue;
                }
            };
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let end = loop {
                tokio::select! {
                    _ = stop.changed() => {
                        let _ = s.send(&Frame::Close { reason: "the console stopped following".into() }).await;
                        break Ok(());
                    }
                    incoming = s.recv() => match incoming {
                        Ok(Incoming::Frame(Frame::Data { bytes, .. })) => {
                            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                                if let Ok(v) = serde_json::from_slice(line) {
                                    let _ = tx.send((device.clone(), Ok(v))).await;
                                }
                            }
                            if let Err(e) = s.consumed(bytes.len()).await {
                                break Err(e.to_string());
                            }
                        }
                        Ok(Incoming::Frame(Frame::Close { reason })) => break Err(reason),
                        Ok(Incoming::Ended(r)) => break Err(why(&r)),
                        Ok(_) => {}
                        Err(e) => break Err(format!("{e:#}")),
                    },
                    _ = tick.tick() => {
                        if let Err(e) = s.tick().await {
                            break Err(e.to_string());
                        }
                    }
                }
            };
            if let Err(e) = end {
                let _ = tx.send((device.clone(), Err(e))).await;
            }
            let _ = s.session.close().await;
        }));
    }
    drop(tx);
    if tasks.is_empty() {
        bail!("no device could be followed");
    }
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u32::MAX as u64)));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some((d, Ok(e))) => {
                    if json {
                        println!("{}", serde_json::json!({"device": d, "ts": e["ts"], "unit": e["unit"], "priority": e["priority"], "message": e["message"]}));
                    } else {
                        println!("{d}  {}  {}  {}", e["ts"].as_str().unwrap_or("-"), e["unit"].as_str().unwrap_or("-"), e["message"].as_str().unwrap_or(""));
                    }
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
                Some((d, Err(e))) => {
                    eprintln!("debfleet: {d}: {e}");
                    failed = true;
                }
                None => break,
            },
            _ = &mut deadline => break,
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    Ok(if failed { crate::exit::FAILED } else { 0 })
}

/// `LOCAL:HOST:PORT`: the local port, and where the device connects.
fn forward_spec(spec: &str) -> Result<(u16, String)> {
    let (local, to) = spec.split_once(':').ok_or_else(|| usage("expected LOCAL_PORT:HOST:PORT"))?;
    let local: u16 = local.parse().map_err(|_| usage(format!("{local:?} is not a local port")))?;
    if !debfleet_protocol::session::valid_forward_target(to) {
        bail!(usage(format!("{to:?}: expected HOST:PORT after the local port")));
    }
    Ok((local, to.to_owned()))
}

enum Local {
    Bytes(u32, Vec<u8>),
    End(u32),
}

/// `debfleet forward DEVICE LOCAL:HOST:PORT`: until Ctrl-C (or the device ends it).
pub async fn forward(ctx: &Ctx, device: &str, spec: &str) -> Result<u8> {
    let device = DeviceId::new(device).map_err(|e| usage(e.to_string()))?;
    let (port, to) = forward_spec(spec)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
    let local = listener.local_addr()?;
    let target = to.clone();
    let mut s = open(ctx, &device, |key| CommandArgs::Forward { key, to: target }).await?;
    eprintln!("debfleet: forwarding {local} to {to} on {device} (Ctrl-C ends)");
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (read_tx, mut reads) = mpsc::channel::<Local>(4);
    let (written_tx, mut written) = mpsc::unbounded_channel::<usize>();
    let mut writers: HashMap<u32, mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
    let mut next = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((conn, _)) = conn else { continue };
                let stream = next;
                next = next.wrapping_add(1);
                s.send(&Frame::Open { stream }).await?;
                let (tx, rx) = mpsc::unbounded_channel();
                writers.insert(stream, tx);
                tokio::spawn(connection(stream, conn, rx, read_tx.clone(), written_tx.clone()));
            }
            read = reads.recv(), if s.room() => match read {
                Some(Local::Bytes(stream, bytes)) => s.send(&Frame::Data { stream, bytes }).await?,
                Some(Local::End(stream)) => s.send(&Frame::Eof { stream, error: None }).await?,
                None => {}
            },
            incoming = s.recv() => match incoming? {
                Incoming::Frame(Frame::Data { stream, bytes }) => {
                    let n = bytes.len();
                    if writers.get(&stream).is_none_or(|w| w.send(bytes).is_err()) {
                        s.consumed(n).await?;
                    }
                }
                Incoming::Frame(Frame::Eof { stream, error }) => {
                    if let Some(e) = error {
                        eprintln!("debfleet: connection {stream}: {e}");
                    }
                    writers.remove(&stream);
                }
                Incoming::Frame(Frame::Close { reason }) => bail!("{device} ended the session: {reason}"),
                Incoming::Ended(r) => bail!("{device} ended the session: {}", why(&r)),
                _ => {}
            },
            Some(n) = written.recv() => s.consumed(n).await?,
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = tick.tick() => s.tick().await?,
        }
    }
    s.send(&Frame::Close { reason: "the console stopped forwarding".into() }).await?;
    s.session.close().await?;
    Ok(0)
}

/// One local connection: what it sends goes to `reads`; what the device sends is written to it.
async fn connection(
    stream: u32,
    conn: tokio::net::TcpStream,
    mut input: mpsc::UnboundedReceiver<Vec<u8>>,
    reads: mpsc::Sender<Local>,
    written: mpsc::UnboundedSender<usize>,
) {
    let (mut r, mut w) = conn.into_split();
    let reading = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = reads.send(Local::End(stream)).await;
                    return;
                }
                Ok(n) => {
                    if reads.send(Local::Bytes(stream, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        assert_eq!(forward_spec("8080:127.0.0.1:80").unwrap(), (8080, "127.0.0.1:80".into()));
        assert_eq!(forward_spec("0:[::1]:22").unwrap(), (0, "[::1]:22".into()));
        for bad in ["8080", "x:127.0.0.1:80", "8080:127.0.0.1", "99999:h:1"] {
            assert!(forward_spec(bad).is_err(), "{bad}");
        }
    }
}
