//! `debfleet-sim-robot`: a simulated mobile base as a ROS node — velocities from `/cmd_vel`,
//! odometry on `/odom` fifty times a second. ROS_MASTER_URI says where the master is; a lost
//! master is registered with again (the bridge's node does that).

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use debfleet_robot_sample::sim::Robot;
use debfleet_ros_bridge::node::{Event, Node, Plan, PubPlan, PublishError, SubPlan};
use debfleet_ros_bridge::types::Registry;

const PERIOD: Duration = Duration::from_millis(20);

fn main() {
    let mut registry = Registry::new(vec![PathBuf::from("/usr/share")]);
    let odometry = match registry.get("nav_msgs/Odometry") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let (tx, rx) = channel();
    let node = match Node::start(tx, Arc::new(|| {})) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: starting the ROS node: {e}");
            std::process::exit(1);
        }
    };
    node.plan(Plan {
        node_name: "debfleet_sim_robot".into(),
        subs: vec![SubPlan {
            stream: "cmd_vel".into(),
            topic: "/cmd_vel".into(),
            decimate: 1,
            max_rate_hz: 0.0,
            fields: Vec::new(),
        }],
        pubs: vec![PubPlan { name: "odom".into(), topic: "/odom".into(), ty: odometry.clone() }],
        max_payload: 4096,
    });
    let mut robot = Robot::default();
    let mut last = Instant::now();
    let mut next = last;
    loop {
        for e in rx.try_iter() {
            match e {
                Event::Sample { value, .. } => robot.command(&value),
                Event::Master(Ok(name)) => eprintln!("info: registered with the ROS master as {name}"),
                Event::Master(Err(why)) => eprintln!("warn: {why}"),
                Event::Warn(w) => eprintln!("warn: {w}"),
            }
        }
        let now = Instant::now();
        robot.step(now.duration_since(last));
        last = now;
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let msg = robot.odometry(stamp.as_secs() as u32, stamp.subsec_nanos());
        match node.publish("odom", &odometry, &msg) {
            Ok(_) | Err(PublishError::NotConnected) => {}
            Err(e) => eprintln!("error: odom: {e:?}"),
        }
        next += PERIOD;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}
