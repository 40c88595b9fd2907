//! Configuration patches (the `cfg` command's `set`, the cfg editor's fields) applied to the
//! default configuration: an accepted patch gives a configuration that applies again unchanged.
fn target(input: &[u8]) {
    let Ok(patch) = serde_json::from_slice::<serde_json::Value>(input) else { return };
    let base = debfleet_protocol::RuntimeCfg::default();
    if let Ok(cfg) = base.apply_patch(&patch) {
        let again = cfg.apply_patch(&patch).expect("an accepted patch applies twice");
        assert_eq!(again, cfg, "idempotent");
    }
}

fn main() {
    debfleet_fuzz::run(target);
}
