//! `debfleet monitor`: a live terminal view of the fleet for debugging — devices and their
//! status, running operations, component states, a merged log, message rates per topic — with
//! keyboard navigation. The broker's messages and the keys feed one [`model::Model`]; the
//! screen is redrawn from it at most ten times a second.

pub mod model;
mod view;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use debfleet_protocol::GroupName;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{execute, terminal};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cmds::UsageError;
use crate::session::Session;
use crate::Ctx;
use model::{Key, Model};

/// Puts the terminal back however the monitor ends (an error, a panic unwinding).
struct Screen;

impl Screen {
    fn enter() -> Result<Screen> {
        terminal::enable_raw_mode().context("the monitor needs a terminal")?;
        execute!(std::io::stdout(), terminal::EnterAlternateScreen).context("the monitor needs a terminal")?;
        Ok(Screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

fn key_of(e: &event::KeyEvent) -> Option<Key> {
    if e.kind == KeyEventKind::Release {
        return None;
    }
    Some(match e.code {
        KeyCode::Up | KeyCode::Char('k') => Key::Up,
        KeyCode::Down | KeyCode::Char('j') => Key::Down,
        KeyCode::Char(' ') => Key::Mark,
        KeyCode::Char('g') => Key::Group,
        KeyCode::PageUp => Key::ScrollUp,
        KeyCode::PageDown => Key::ScrollDown,
        KeyCode::End | KeyCode::Char('f') => Key::Follow,
        KeyCode::Char('q') | KeyCode::Esc => Key::Quit,
        KeyCode::Char('c') if e.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
        _ => return None,
    })
}

pub async fn run(ctx: &Ctx, group: Option<String>) -> Result<u8> {
    let group = group.map(|g| GroupName::new(g).map_err(|e| UsageError(e.to_string()))).transpose()?;
    let mut session = Session::connect(ctx.connect_options()).await?;
    session.subscribe(&[ctx.topics.fleet_filter()]).await?;
    let mut model = Model::new(ctx.topics.clone(), group);
    let screen = Screen::enter()?;
    let mut term = ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(std::io::stdout()))?;
    term.clear()?;
    // Keys come from a blocking reader; the loop waits on the broker, keys and the clock.
    let (keys_tx, mut keys) = mpsc::unbounded_channel();
    std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) => {
                    if let Some(k) = key_of(&k) {
                        if keys_tx.send(k).is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            },
            Ok(false) => {
                if keys_tx.is_closed() {
                    return;
                }
            }
            Err(_) => return,
        }
    });
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let broker = ctx.broker.clone();
    let mut dirty = true;
    let mut drawn = Instant::now();
    loop {
        tokio::select! {
            m = session.recv() => {
                let msg = m?;
                model.message(&msg.topic, &msg.payload, Instant::now());
                dirty = true;
            }
            k = keys.recv() => {
                match k {
                    Some(k) if model.key(k) => dirty = true,
                    _ => break,
                }
            }
            _ = tick.tick() => {
                // Rates move with the clock: redrawn each second even when nothing arrives.
                if dirty || drawn.elapsed() >= Duration::from_secs(1) {
                    let rates = model.rates(Instant::now());
                    term.draw(|f| view::draw(f, &model, &rates, &broker))?;
                    (dirty, drawn) = (false, Instant::now());
                }
            }
            _ = sigterm.recv() => break,
        }
    }
    drop(screen);
    session.disconnect().await;
    Ok(0)
}
