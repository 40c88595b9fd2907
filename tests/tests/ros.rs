//! The ROS 1 bridge (issue 17) against Debian's real rosmaster and rostopic, through a real
//! agent and Mosquitto: a ROS topic on the device's MQTT stream with the selected fields, a
//! console command that `rostopic echo` sees with the declared type, wrong types and fields
//! refused before anything reaches ROS, a stale topic, and the master killed and restarted.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use debfleet_tests::ros::{self, RosMaster};
use debfleet_tests::*;
use serde_json::json;

fn bridge(socket: &Path, dir: &Path, master: &RosMaster) -> Child {
    Command::new(bin("debfleet-ros-bridge"))
        .envs(master.env())
        .env("DEBFLEET_SOCKET", socket)
        .env("STATE_DIRECTORY", dir.join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("bridge.log")).unwrap())
        .spawn()
        .unwrap()
}

const STREAM: &str = "debfleet/device/rb-1/components/ros-bridge/stream";
const STATE: &str = "debfleet/device/rb-1/components/ros-bridge/state";
const STATUS: &str = "debfleet/device/rb-1/components/ros-bridge/status";

#[test]
fn ros_topics_and_commands_through_the_bridge() {
    assert!(
        ros::available(),
        "Debian's ROS 1 is missing: scripts/test.sh installs python3-rosmaster and python3-rostopic"
    );
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let agent = Agent::start(AgentSpec { id: "rb-1", port: m.port, groups: &["robots"], extra: "" });
    obs.wait("debfleet/device/rb-1/status", Duration::from_secs(20), |v| v["state"] == "online");
    let mut master = RosMaster::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("bridge.log");
    let _bridge = Killed(bridge(&agent.socket(), dir.path(), &master));
    obs.wait(STATUS, Duration::from_secs(30), |v| v["state"] == "running");

    // Configured from the console: /odom forwarded with two fields, at most 5 a second; a
    // publisher of geometry_msgs/Twist on /cmd_vel; a topic nobody publishes.
    let subs = json!({
        "odom": {"topic": "/odom", "max_rate_hz": 5, "fields": ["pose.pose.position", "twist.twist.angular.z"]},
        "quiet": {"topic": "/nobody_publishes_this"},
    });
    let pubs = json!({"cmd_vel": {"topic": "/cmd_vel", "type": "geometry_msgs/Twist"}});
    let (code, v, text) = console_result(
        &m.url(),
        &[
            "component",
            "cfg",
            "rb-1",
            "ros-bridge",
            &format!("subscriptions={subs}"),
            &format!("publishers={pubs}"),
            "stale_after_s=3",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["publishers"]["cmd_vel"]["type"], "geometry_msgs/Twist", "{text}");

    // rostopic pub on /odom appears on the device's MQTT stream with the selected fields only.
    let odom = master.publish(
        "/odom",
        "nav_msgs/Odometry",
        50,
        "{header: {frame_id: odom}, pose: {pose: {position: {x: 1.5, y: -2.0}}}, twist: {twist: {angular: {z: 0.25}}}}",
    );
    let s = obs.wait(STREAM, Duration::from_secs(30), |v| v["stream"] == "odom");
    assert_eq!(
        s["value"],
        json!({"pose": {"pose": {"position": {"x": 1.5, "y": -2.0, "z": 0.0}}}, "twist": {"twist": {"angular": {"z": 0.25}}}}),
        "{s}"
    );
    obs.wait(STATE, Duration::from_secs(10), |v| v["state"]["streams"]["odom"]["type"] == "nav_msgs/Odometry");
    // 50 Hz in, at most 5 Hz out: over 3 s, not more than 5 a second (and a margin of one).
    obs.clear();
    std::thread::sleep(Duration::from_secs(3));
    let n = obs.messages().iter().filter(|m| m.topic == STREAM && m.json()["stream"] == "odom").count();
    assert!((6..=16).contains(&n), "{n} samples in 3 s at max_rate_hz 5");

    // The topic nobody publishes turns stale (asked: the retained state may have said so before
    // the observer's log was cleared).
    wait_for(Duration::from_secs(20), "the quiet stream to turn stale", || {
        let (code, v, _) = console_result(&m.url(), &["component", "call", "rb-1", "ros-bridge", "state", "--json"]);
        let s = &v[0]["result"]["streams"];
        (code == Some(0) && s["quiet"]["stale"] == true && s["odom"]["stale"] == false).then_some(())
    });

    // A console command makes a message `rostopic echo` sees, with the declared type.
    let echo = master.echo("/cmd_vel");
    let data = json!({"linear": {"x": 0.5}, "angular": {"z": -0.75}});
    let mut sent = 0;
    wait_for(Duration::from_secs(30), "rostopic echo to see the command", || {
        let (code, v, text) = console_result(
            &m.url(),
            &[
                "component",
                "call",
                "rb-1",
                "ros-bridge",
                "publish",
                "publisher=cmd_vel",
                &format!("data={data}"),
                "type=geometry_msgs/Twist",
                "request_id=r-1",
                "--json",
            ],
        );
        assert_eq!(code, Some(0), "{text}");
        assert_eq!(v[0]["result"]["request_id"], "r-1", "{text}");
        assert_eq!(v[0]["result"]["type"], "geometry_msgs/Twist", "{text}");
        sent += 1;
        std::thread::sleep(Duration::from_millis(300));
        (echo.lines().len() > 1).then_some(())
    });
    assert_eq!(master.topic_type("/cmd_vel"), "geometry_msgs/Twist");
    let lines = echo.lines();
    assert_eq!(
        lines[0],
        "%time,field.linear.x,field.linear.y,field.linear.z,field.angular.x,field.angular.y,field.angular.z"
    );
    assert!(lines[1].ends_with(",0.5,0.0,0.0,0.0,0.0,-0.75"), "{lines:?}");

    // Wrong type or fields: refused with a clear error, and nothing reaches ROS.
    std::thread::sleep(Duration::from_secs(1));
    let seen = echo.lines().len();
    assert!(seen <= sent + 1, "{seen} lines for {sent} commands");
    for (args, says) in [
        (
            vec!["publisher=cmd_vel".to_owned(), "type=std_msgs/String".into(), r#"data={"data":"hi"}"#.into()],
            "not std_msgs/String",
        ),
        (
            vec!["publisher=cmd_vel".to_owned(), r#"data={"linear":{"x":"fast"}}"#.into()],
            "linear.x: expected a number, got a string",
        ),
        (
            vec!["publisher=cmd_vel".to_owned(), r#"data={"speed":1}"#.into()],
            "data: geometry_msgs/Twist has no field \\\"speed\\\"",
        ),
        (
            vec!["publisher=cmd_vel".to_owned(), r#"data={"linear":{"x":1,"w":2}}"#.into()],
            "linear: geometry_msgs/Vector3 has no field \\\"w\\\"",
        ),
        (vec!["publisher=arm".to_owned(), r#"data={}"#.into()], "no publisher \\\"arm\\\" (configured: cmd_vel)"),
        (vec!["publisher=cmd_vel".to_owned(), "data=[1,2]".into()], "expected an object"),
    ] {
        let mut a = vec!["component", "call", "rb-1", "ros-bridge", "publish"];
        a.extend(args.iter().map(String::as_str));
        a.push("--json");
        let (code, _, text) = console_result(&m.url(), &a);
        assert_ne!(code, Some(0), "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(echo.lines().len(), seen, "nothing published by refused commands: {:?}", echo.lines());
    drop(echo);

    // The master's topics, as the bridge sees them.
    let (code, v, text) = console_result(&m.url(), &["component", "call", "rb-1", "ros-bridge", "topics", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        v[0]["result"]["topics"].as_array().unwrap().contains(&json!({"topic": "/odom", "type": "nav_msgs/Odometry"})),
        "{text}"
    );

    // A ROS service (rospy's, std_srvs/SetBool) called as an action; a request with wrong
    // fields is refused before the service sees it.
    let server = master.python(
        "import sys, rospy\n\
         from std_srvs.srv import SetBool, SetBoolResponse\n\
         rospy.init_node('motors')\n\
         def handle(req):\n    print('called', req.data, flush=True)\n    return SetBoolResponse(success=True, message='motors on' if req.data else 'motors off')\n\
         rospy.Service('/enable_motors', SetBool, handle)\n\
         print('ready', flush=True)\n\
         rospy.spin()\n",
    );
    wait_for(Duration::from_secs(30), "the service", || server.lines().iter().any(|l| l == "ready").then_some(()));
    let services = json!({"motors": {"service": "/enable_motors", "type": "std_srvs/SetBool"}});
    let (code, _, text) =
        console_result(&m.url(), &["component", "cfg", "rb-1", "ros-bridge", &format!("services={services}")]);
    assert_eq!(code, Some(0), "{text}");
    let (code, v, text) = console_result(
        &m.url(),
        &["component", "call", "rb-1", "ros-bridge", "service", "name=motors", r#"data={"data":true}"#, "--json"],
    );
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["response"], json!({"success": true, "message": "motors on"}), "{text}");
    for (data, says) in
        [(r#"data={"data":"yes"}"#, "data: expected true or false"), (r#"data={"on":true}"#, "has no field")]
    {
        let (code, _, text) =
            console_result(&m.url(), &["component", "call", "rb-1", "ros-bridge", "service", "name=motors", data]);
        assert_ne!(code, Some(0), "{text}");
        assert!(text.contains(says) && text.contains("the service was not called"), "{text}");
    }
    let (code, _, text) =
        console_result(&m.url(), &["component", "call", "rb-1", "ros-bridge", "service", "name=lights"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("no service") && text.contains("motors"), "{text}");
    assert_eq!(server.lines().iter().filter(|l| l.starts_with("called")).count(), 1, "{:?}", server.lines());
    drop(server);

    // The master killed: the component says so, commands are refused, the agent's connection
    // stays up. Restarted: the bridge registers again and forwarding resumes.
    drop(odom);
    obs.clear();
    master.kill();
    let st = obs.wait(STATUS, Duration::from_secs(20), |v| v["state"] == "error");
    assert!(st["message"].as_str().unwrap_or("").contains("ROS master"), "{st}");
    let (code, _, text) = console_result(
        &m.url(),
        &["component", "call", "rb-1", "ros-bridge", "publish", "publisher=cmd_vel", r#"data={"linear":{"x":1}}"#],
    );
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("not connected to the ROS master"), "{text}");
    master.restart();
    obs.wait(STATUS, Duration::from_secs(30), |v| v["state"] == "running");
    let _odom = master.publish("/odom", "nav_msgs/Odometry", 10, "{pose: {pose: {position: {x: 7.0}}}}");
    let s = obs.wait(STREAM, Duration::from_secs(30), |v| {
        v["stream"] == "odom" && v["value"]["pose"]["pose"]["position"]["x"] == 7.0
    });
    assert_eq!(s["value"]["twist"]["twist"]["angular"]["z"], 0.0, "{s}");
    let echo = master.echo("/cmd_vel");
    wait_for(Duration::from_secs(30), "a command after the master's restart", || {
        let (code, _, text) = console_result(
            &m.url(),
            &["component", "call", "rb-1", "ros-bridge", "publish", "publisher=cmd_vel", r#"data={"linear":{"x":2}}"#],
        );
        assert_eq!(code, Some(0), "{text}");
        std::thread::sleep(Duration::from_millis(300));
        echo.lines().iter().any(|l| l.contains(",2.0,")).then_some(())
    });
    // The agent's own connection never went down meanwhile.
    let offline = obs.messages().into_iter().filter(|m| m.topic == "debfleet/device/rb-1/status").count();
    assert_eq!(offline, 0, "the device's status changed while the ROS master was away");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("registered with the ROS master"), "{log}");
}

/// The robot sample drives the simulated robot round its waypoints: console → agent →
/// component → ROS → simulated robot → odometry → component → console.
#[test]
fn the_robot_sample_patrols_against_the_simulated_robot() {
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let agent = Agent::start(AgentSpec { id: "rb-2", port: m.port, groups: &[], extra: "" });
    obs.wait("debfleet/device/rb-2/status", Duration::from_secs(20), |v| v["state"] == "online");
    let master = RosMaster::start();
    let dir = tempfile::tempdir().unwrap();
    let _sim = Killed(
        master
            .command(bin("debfleet-sim-robot"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("sim.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let _robot = Killed(
        master
            .command(bin("debfleet-robot-sample"))
            .env("DEBFLEET_SOCKET", agent.socket())
            .env("STATE_DIRECTORY", dir.path().join("robot"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("robot.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    const STATE: &str = "debfleet/device/rb-2/components/robot/state";
    obs.wait(STATE, Duration::from_secs(30), |v| v["state"]["ros"] == "connected" && v["state"]["pose"]["x"] == 0.0);
    // A small square, twice round.
    let (code, _, text) = console_result(
        &m.url(),
        &["component", "cfg", "rb-2", "robot", "waypoints=[[0.5,0],[0.5,0.5],[0,0.5],[0,0]]", "max_speed=1.0"],
    );
    assert_eq!(code, Some(0), "{text}");
    let (code, v, text) =
        console_result(&m.url(), &["component", "call", "rb-2", "robot", "patrol", "laps=2", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["mode"], "patrolling", "{text}");
    // It passes the far corner, then comes home.
    obs.wait(STATE, Duration::from_secs(60), |v| {
        v["state"]["pose"]["x"].as_f64().unwrap_or(0.0) > 0.4 && v["state"]["pose"]["y"].as_f64().unwrap_or(0.0) > 0.4
    });
    let done = obs.wait(STATE, Duration::from_secs(120), |v| v["state"]["mode"] == "finished");
    assert_eq!(done["state"]["reached"], 8, "{done}");
    let (x, y) = (done["state"]["pose"]["x"].as_f64().unwrap(), done["state"]["pose"]["y"].as_f64().unwrap());
    assert!(x.hypot(y) <= 0.15, "home within the tolerance: {done}");
    // Started again and stopped from the console: it stands still.
    let (code, _, text) = console_result(&m.url(), &["component", "call", "rb-2", "robot", "patrol"]);
    assert_eq!(code, Some(0), "{text}");
    obs.wait(STATE, Duration::from_secs(30), |v| v["state"]["pose"]["x"].as_f64().unwrap_or(0.0) > 0.2);
    let (code, v, text) = console_result(&m.url(), &["component", "call", "rb-2", "robot", "stop", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["mode"], "stopped", "{text}");
    std::thread::sleep(Duration::from_secs(2));
    let (_, a, _) = console_result(&m.url(), &["component", "call", "rb-2", "robot", "state", "--json"]);
    std::thread::sleep(Duration::from_secs(2));
    let (_, b, _) = console_result(&m.url(), &["component", "call", "rb-2", "robot", "state", "--json"]);
    assert_eq!(a[0]["result"]["pose"], b[0]["result"]["pose"], "stopped means still");
}

/// The same loop on a lab device (real systemd, apt and dpkg), everything installed from our
/// repository through the console: the simulated robot and the robot sample run as their
/// units, against a rosmaster on the host (the lab shares the host's network), the patrol is
/// started and stopped from the console.
#[test]
fn a_patrol_on_a_lab_device_installed_from_the_repository() {
    use debfleet_tests::lab::Device;
    use debfleet_tests::repo::RepoServer;

    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let master = RosMaster::start();
    let repo = RepoServer::start(&[]);
    for p in ["debfleet-robot-sample", "debfleet-sim-robot"] {
        assert!(repo.publish(&own_deb(p), "stable").status.success(), "{p}");
    }
    let dev = Device::boot("rb-3");
    dev.write("/etc/default/debfleet-ros", &format!("ROS_MASTER_URI={}\nROS_HOSTNAME=127.0.0.1\n", master.uri()));
    let config = format!("broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\n\n[apt]\nwatch_s = 3\n", m.url());
    dev.install_agent(&config, &repo);
    obs.wait("debfleet/device/rb-3/status", Duration::from_secs(30), |v| v["state"] == "online");

    for p in ["debfleet-sim-robot", "debfleet-robot-sample"] {
        let (code, v, text) = console_result(&m.url(), &["install", "rb-3", p, "--json"]);
        assert_eq!(code, Some(0), "{text}");
        assert_eq!(v[0]["state"], "succeeded", "{text}");
    }
    obs.wait("debfleet/device/rb-3/state/components", Duration::from_secs(30), |v| {
        v["components"]["robot"]["package"] == "debfleet-robot-sample" && v["components"]["robot"]["state"] == "idle"
    });
    const STATE: &str = "debfleet/device/rb-3/components/robot/state";
    obs.wait(STATE, Duration::from_secs(30), |v| v["state"]["ros"] == "connected" && v["state"]["pose"]["x"] == 0.0);
    // Both nodes registered with the host's master, from inside the device.
    let out = master.command("rosnode").arg("list").output().unwrap();
    let nodes = String::from_utf8_lossy(&out.stdout);
    assert!(nodes.contains("/debfleet_sim_robot") && nodes.contains("/debfleet_robot_sample"), "{nodes}");

    let (code, _, text) = console_result(
        &m.url(),
        &["component", "cfg", "rb-3", "robot", "waypoints=[[0.6,0],[0.6,0.6],[0,0]]", "max_speed=1.0"],
    );
    assert_eq!(code, Some(0), "{text}");
    let (code, _, text) = console_result(&m.url(), &["component", "call", "rb-3", "robot", "patrol"]);
    assert_eq!(code, Some(0), "{text}");
    let done = obs.wait(STATE, Duration::from_secs(120), |v| v["state"]["mode"] == "finished");
    assert_eq!(done["state"]["reached"], 3, "{done}");
    // Again, stopped halfway from the console.
    let (code, _, text) = console_result(&m.url(), &["component", "call", "rb-3", "robot", "patrol"]);
    assert_eq!(code, Some(0), "{text}");
    obs.wait(STATE, Duration::from_secs(30), |v| v["state"]["pose"]["x"].as_f64().unwrap_or(0.0) > 0.2);
    let (code, v, text) = console_result(&m.url(), &["component", "call", "rb-3", "robot", "stop", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(v[0]["result"]["mode"], "stopped", "{text}");
    // The units run as their own users, as packaged.
    let units = dev.ok(&["systemctl", "is-active", "debfleet-robot-sample", "debfleet-sim-robot"]);
    assert_eq!(units.split_whitespace().collect::<Vec<_>>(), ["active", "active"], "{units}");
}
