//! Commands as devices parse them: `VERB\nPAYLOAD`. What parses must serialise and parse back to
//! the same command (sender and receiver cannot disagree), signature included.
use debfleet_protocol::command::parse_command;

fn target(input: &[u8]) {
    let (verb, payload) = debfleet_fuzz::split_line(input);
    if let Ok(cmd) = parse_command(verb, payload) {
        let again = parse_command(verb, &cmd.to_payload()).expect("a parsed command's payload parses");
        assert_eq!(again, cmd, "round trip");
        let _ = cmd.signed_message("k", &debfleet_protocol::signature::SignTarget::Fleet, 0);
    }
}

fn main() {
    debfleet_fuzz::run(target);
}
