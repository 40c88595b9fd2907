//! Drawing the model: devices on the left, the selected device's operations and components
//! on the right, the merged log below, message rates at the bottom, keys on the last line.

use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, List, ListItem, Paragraph};
use ratatui::Frame;

use super::model::Model;

fn word<T: serde::Serialize>(t: &T) -> String {
    serde_json::to_value(t).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| "?".into())
}

pub fn draw(f: &mut Frame, m: &Model, rates: &[(String, f64)], broker: &str) {
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Min(8), Constraint::Length(12), Constraint::Length(6), Constraint::Length(1)])
        .split(f.area());
    let top = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(40), Constraint::Percentage(60)])
        .split(rows[0]);
    devices(f, m, top[0], broker);
    let right = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Percentage(50), Constraint::Percentage(50)])
        .split(top[1]);
    operations(f, m, right[0]);
    components(f, m, right[1]);
    log(f, m, rows[1]);
    rates_view(f, rates, rows[2]);
    let keys = "↑/↓ select  space mark for the log  g group filter  PgUp/PgDn scroll  End follow  q quit";
    f.render_widget(Paragraph::new(keys).style(Style::default().fg(Color::DarkGray)), rows[3]);
}

fn devices(f: &mut Frame, m: &Model, area: Rect, broker: &str) {
    let visible = m.visible();
    let online = visible
        .iter()
        .filter(|d| m.device(d).and_then(|d| d.status.as_ref()).is_some_and(|s| s.state.as_str() == "online"))
        .count();
    let title = format!(
        " Devices {online}/{} online · group {} · {broker} ",
        visible.len(),
        m.group.as_ref().map_or("all".to_owned(), |g| g.to_string())
    );
    let items: Vec<ListItem> = visible
        .iter()
        .map(|id| {
            let d = m.device(id);
            let state = d.and_then(|d| d.status.as_ref()).map_or("?", |s| s.state.as_str());
            let colour = match state {
                "online" => Color::Green,
                "lost" => Color::Red,
                _ => Color::Yellow,
            };
            let running = d.map_or(0, |d| d.ops.values().filter(|o| !o.state.is_final()).count());
            let groups: Vec<String> = d.map(|d| d.groups().iter().map(|g| g.to_string()).collect()).unwrap_or_default();
            let sel = m.selected.as_ref() == Some(*id);
            let mark = if m.marked.contains(*id) { "*" } else { " " };
            let mut spans = vec![
                Span::raw(format!("{}{mark}", if sel { ">" } else { " " })),
                Span::styled(
                    format!("{:<16}", id.as_str()),
                    if sel { Style::default().add_modifier(Modifier::BOLD) } else { Style::default() },
                ),
                Span::styled(format!("{state:<8}"), Style::default().fg(colour)),
                Span::raw(format!(" {}", groups.join(","))),
            ];
            if running > 0 {
                spans.push(Span::styled(format!("  {running} running"), Style::default().fg(Color::Cyan)));
            }
            ListItem::new(Line::from(spans))
        })
        .collect();
    f.render_widget(List::new(items).block(Block::default().borders(Borders::ALL).title(title)), area);
}

fn operations(f: &mut Frame, m: &Model, area: Rect) {
    // Running operations of every visible device first, then the selected device's last ones.
    let mut lines: Vec<Line> = Vec::new();
    for id in m.visible() {
        let Some(d) = m.device(id) else { continue };
        for (op, r) in &d.ops {
            if r.state.is_final() {
                continue;
            }
            let phase = r.phase.as_ref().map(word).unwrap_or_default();
            let pc = r.percent.map(|p| format!(" {p}%")).unwrap_or_default();
            lines.push(Line::from(vec![
                Span::styled(format!("{id} "), Style::default().add_modifier(Modifier::BOLD)),
                Span::raw(format!("{op} {} ", r.verb)),
                Span::styled(format!("{} {phase}{pc}", word(&r.state)), Style::default().fg(Color::Cyan)),
            ]));
        }
    }
    if let Some(d) = m.selected.as_ref().and_then(|s| m.device(s)) {
        let mut done: Vec<_> = d.ops.values().filter(|r| r.state.is_final()).collect();
        done.sort_by(|a, b| b.updated_at.cmp(&a.updated_at));
        for r in done.into_iter().take(area.height as usize) {
            let colour = if word(&r.state) == "succeeded" { Color::Green } else { Color::Red };
            let err = r.error.as_ref().map(|e| format!(" {}", e.code.as_str())).unwrap_or_default();
            lines.push(Line::from(vec![
                Span::raw(format!("{} {} ", r.id, r.verb)),
                Span::styled(format!("{}{err}", word(&r.state)), Style::default().fg(colour)),
                Span::styled(
                    format!(" {}", r.updated_at.get(11..19).unwrap_or("")),
                    Style::default().fg(Color::DarkGray),
                ),
            ]));
        }
    }
    f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Operations ")), area);
}

fn components(f: &mut Frame, m: &Model, area: Rect) {
    let mut lines = Vec::new();
    let sel = m.selected.as_ref();
    if let Some(d) = sel.and_then(|s| m.device(s)) {
        for (id, c) in &d.component {
            let state = c.status.as_ref().map_or("?".to_owned(), |s| s.state.as_str().to_owned());
            let message = c.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
            let summary: Vec<String> = c
                .state
                .as_ref()
                .map(|s| {
                    s.state
                        .iter()
                        .filter(|(_, v)| v.is_string() || v.is_number() || v.is_boolean())
                        .take(6)
                        .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                        .collect()
                })
                .unwrap_or_default();
            let colour = match state.as_str() {
                "running" => Color::Green,
                "error" => Color::Red,
                _ => Color::Yellow,
            };
            lines.push(Line::from(vec![
                Span::styled(format!("{:<14}", id.as_str()), Style::default().add_modifier(Modifier::BOLD)),
                Span::styled(format!("{state:<8}"), Style::default().fg(colour)),
                Span::raw(format!(" {} {message}", summary.join(" "))),
            ]));
        }
    }
    let title = format!(" Components of {} ", sel.map_or("-".to_owned(), |s| s.to_string()));
    f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title)), area);
}

fn log(f: &mut Frame, m: &Model, area: Rect) {
    let height = area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = m
        .log_view(height)
        .into_iter()
        .map(|e| {
            let colour = match e.level.as_str() {
                "error" => Color::Red,
                "warn" => Color::Yellow,
                _ => Color::Reset,
            };
            Line::from(vec![
                Span::styled(format!("{} ", e.ts.get(11..19).unwrap_or("")), Style::default().fg(Color::DarkGray)),
                Span::styled(format!("{:<12} ", e.device.as_str()), Style::default().add_modifier(Modifier::BOLD)),
                Span::styled(format!("{:<5} ", e.level), Style::default().fg(colour)),
                Span::raw(format!("{}: {}", e.target, e.msg)),
            ])
        })
        .collect();
    let who = if m.marked.is_empty() { "visible devices".to_owned() } else { format!("{} marked", m.marked.len()) };
    let title = if m.scroll > 0 {
        format!(" Log of {who} · {} lines back (End follows) ", m.scroll)
    } else {
        format!(" Log of {who} ")
    };
    f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title)), area);
}

fn rates_view(f: &mut Frame, rates: &[(String, f64)], area: Rect) {
    let cells: Vec<String> = rates.iter().take(12).map(|(p, r)| format!("{r:>6.1}/s {p}")).collect();
    let half = cells.len().div_ceil(2);
    let lines: Vec<Line> = (0..half)
        .map(|i| {
            let right = cells.get(i + half).cloned().unwrap_or_default();
            Line::from(format!("{:<60} {right}", cells[i]))
        })
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Messages per topic (10 s) ")),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use debfleet_protocol::Topics;
    use ratatui::backend::TestBackend;
    use serde_json::json;
    use std::time::Instant;

    fn screen(m: &Model, rates: &[(String, f64)]) -> String {
        let mut term = ratatui::Terminal::new(TestBackend::new(160, 40)).unwrap();
        term.draw(|f| draw(f, m, rates, "mqtt://127.0.0.1:1883")).unwrap();
        let buf = term.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| (0..buf.area.width).map(|x| buf[(x, y)].symbol().to_owned()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_running_operation_with_its_progress_and_a_component_in_error() {
        let mut m = Model::new(Topics::default(), None);
        let now = Instant::now();
        let meta = json!({"v": 1, "device_id": "d1", "agent_version": "0.1.0", "hostname": "d1",
            "os": {"id": "debian", "version_id": "12", "pretty_name": "Debian"}, "arch": "amd64", "kernel": "6.1",
            "boot_id": "b", "groups": ["lab"], "labels": {}, "commands": ["ping"]});
        m.message("debfleet/device/d1/meta", meta.to_string().as_bytes(), now);
        let status = json!({"v": 1, "state": "online", "since": "2026-12-05T03:00:00.000Z", "boot_id": "b"});
        m.message("debfleet/device/d1/status", status.to_string().as_bytes(), now);
        let op = json!({"v": 1, "id": "op-7", "verb": "install", "state": "running", "accepted_at": "2026-12-05T03:00:00.000Z",
            "updated_at": "2026-12-05T03:00:01.000Z", "phase": "downloading", "percent": 45});
        m.message("debfleet/device/d1/op/op-7", op.to_string().as_bytes(), now);
        let st = json!({"v": 1, "state": "error", "since": "2026-12-05T03:00:00.000Z", "message": "the ROS master stopped answering"});
        m.message("debfleet/device/d1/components/ros-bridge/status", st.to_string().as_bytes(), now);
        let rates = m.rates(now);
        let s = screen(&m, &rates);
        assert!(s.contains("Devices 1/1 online · group all"), "{s}");
        assert!(s.contains("│> d1 ") && s.contains("1 running"), "{s}");
        assert!(s.contains("d1 op-7 install running downloading 45%"), "{s}");
        assert!(
            s.contains("ros-bridge") && s.contains("error") && s.contains("the ROS master stopped answering"),
            "{s}"
        );
        assert!(s.contains("/s debfleet/device/+/op/+"), "{s}");
    }
}
