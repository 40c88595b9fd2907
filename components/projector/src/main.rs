//! `debfleet-projector`: the component's process, run by its systemd unit.
//! `debfleet-projector --simulate PATH` instead runs a simulated Optoma projector on a
//! pseudo-terminal linked at PATH (for the lab and the demo, which have no serial port).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => debfleet_component::run(debfleet_projector::projector::Projector::new()),
        [flag, path] if flag == "--simulate" => {
            let _sim = debfleet_projector::sim::SimProjector::start(std::path::Path::new(path));
            eprintln!("a simulated projector answers on {path}");
            loop {
                std::thread::park();
            }
        }
        _ => {
            eprintln!("usage: debfleet-projector [--simulate PATH]");
            std::process::exit(2);
        }
    }
}
