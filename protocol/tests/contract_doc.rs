//! Every example in docs/contract.md goes through the protocol types and back unchanged, and
//! every payload kind has at least one example: the document and the code cannot drift apart.

use std::collections::BTreeSet;

use debfleet_protocol::command::parse_command;
use debfleet_protocol::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn examples() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/contract.md");
    let text = std::fs::read_to_string(path).expect("docs/contract.md");
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some((kind, mut body)) = current.take() {
            if line.trim_start() == "```" {
                out.push((kind, body));
            } else {
                body.push_str(line);
                body.push('\n');
                current = Some((kind, body));
            }
        } else if let Some(kind) = line.strip_prefix("```json example=") {
            current = Some((kind.trim().to_owned(), String::new()));
        }
    }
    assert!(current.is_none(), "unterminated example in docs/contract.md");
    out
}

fn round_trip<T: DeserializeOwned + Serialize>(kind: &str, body: &str) {
    let original: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{kind}: example is not JSON: {e}\n{body}"));
    let typed: T =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{kind}: does not parse as the type: {e}\n{body}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(back, original, "{kind}: round trip changed the example");
}

#[test]
fn every_example_round_trips_through_the_types() {
    let examples = examples();
    assert!(examples.len() >= 15, "found only {} examples", examples.len());
    let mut kinds = BTreeSet::new();
    for (kind, body) in &examples {
        match kind.as_str() {
            "meta" => round_trip::<Meta>(kind, body),
            "status" => round_trip::<Status>(kind, body),
            "cfg" => round_trip::<CfgMessage>(kind, body),
            "packages" => round_trip::<PackagesState>(kind, body),
            "telemetry" => round_trip::<Telemetry>(kind, body),
            "logs" => round_trip::<LogBatch>(kind, body),
            "op" => round_trip::<OpRecord>(kind, body),
            "rejected" => round_trip::<Rejected>(kind, body),
            "units" => round_trip::<UnitsState>(kind, body),
            "package-result" => round_trip::<PackageResult>(kind, body),
            "link" => round_trip::<LinkState>(kind, body),
            "components" => round_trip::<component::ComponentsState>(kind, body),
            "component-meta" => round_trip::<component::ComponentMeta>(kind, body),
            "component-status" => round_trip::<component::ComponentStatus>(kind, body),
            "component-state" => round_trip::<component::ComponentStateMessage>(kind, body),
            "component-cfg" => round_trip::<component::ComponentCfgMessage>(kind, body),
            "component-telemetry" => round_trip::<component::ComponentTelemetry>(kind, body),
            "component-stream" => round_trip::<component::ComponentStream>(kind, body),
            "desired" => {
                round_trip::<desired::DesiredRecord>(kind, body);
                desired::DesiredRecord::parse(body.as_bytes()).unwrap_or_else(|e| panic!("desired: {e}\n{body}"));
            }
            "desired-state" => round_trip::<desired::DesiredReport>(kind, body),
            "rollout-spec" => {
                round_trip::<rollout::RolloutSpec>(kind, body);
                rollout::RolloutSpec::parse(body.as_bytes()).unwrap_or_else(|e| panic!("rollout-spec: {e}\n{body}"));
            }
            "rollout" => round_trip::<rollout::RolloutState>(kind, body),
            "rollout-control" => round_trip::<rollout::RolloutControl>(kind, body),
            "rollout-lease" => round_trip::<rollout::Lease>(kind, body),
            k if k.starts_with("cmd:") => {
                let verb = &k[4..];
                let cmd =
                    parse_command(verb, body.as_bytes()).unwrap_or_else(|r| panic!("{k}: rejected: {}", r.message));
                let id = serde_json::from_str::<Value>(body).unwrap()["id"].as_str().unwrap().to_owned();
                assert_eq!(cmd.id.as_str(), id);
                assert_eq!(cmd.verb.as_str(), verb);
            }
            k if k.starts_with("cmd-error:") => {
                let (code, verb) = k[10..].split_once(':').expect("cmd-error:CODE:VERB");
                let r = parse_command(verb, body.as_bytes()).expect_err(k);
                assert_eq!(r.code.as_str(), code, "{k}: {}", r.message);
            }
            other => panic!("unknown example kind {other:?}"),
        }
        kinds.insert(kind.split(':').next().unwrap().to_owned());
    }
    for needed in [
        "meta",
        "status",
        "cfg",
        "packages",
        "units",
        "telemetry",
        "logs",
        "op",
        "package-result",
        "link",
        "components",
        "component-meta",
        "component-status",
        "component-state",
        "component-cfg",
        "component-telemetry",
        "desired",
        "desired-state",
        "rollout-spec",
        "rollout",
        "rollout-control",
        "rollout-lease",
        "rejected",
        "cmd",
        "cmd-error",
    ] {
        assert!(kinds.contains(needed), "docs/contract.md has no {needed} example");
    }
    // Every verb and every error code is documented with an example or in the tables.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/contract.md")).unwrap();
    for verb in Verb::ALL {
        assert!(doc.contains(&format!("| `{}` |", verb.as_str())), "verb {} is not in the table", verb.as_str());
    }
    for code in ErrorCode::ALL {
        assert!(doc.contains(&format!("| `{}` |", code.as_str())), "error code {} is not in the table", code.as_str());
    }
    // The topics table says how each topic travels: the same as `Topic::delivery`.
    let topics = Topics::default();
    let mut rows = 0;
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(name) = cells.get(1).and_then(|c| c.strip_prefix('`')).and_then(|c| c.strip_suffix('`')) else {
            continue;
        };
        if !name.starts_with("debfleet/") || cells.len() < 6 || !cells[4].chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let concrete = name
            .replace("/ID/", "/lab-1/")
            .replace("OPID", "op-1")
            .replace("VERB", "ping")
            .replace("/G/", "/lab/")
            .replace("CID", "led-strip");
        let concrete = match (concrete.strip_suffix("/ID"), concrete.strip_suffix("/G")) {
            (Some(head), _) => format!("{head}/lab-1"),
            (_, Some(head)) => format!("{head}/lab"),
            _ => concrete,
        };
        let topic = topics.parse(&concrete).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (retained, qos) = topic.delivery();
        assert_eq!(cells[3].starts_with("yes"), retained, "{name}: retained");
        let want = if cells[4] == "1" { topics::Qos::AtLeastOnce } else { topics::Qos::AtMostOnce };
        assert_eq!(qos, want, "{name}: QoS");
        rows += 1;
    }
    assert!(rows >= 12, "only {rows} topic rows checked");
    for phase in Phase::ALL {
        assert!(doc.contains(&format!("| `{}` |", phase.as_str())), "phase {} is not in the table", phase.as_str());
    }
}
