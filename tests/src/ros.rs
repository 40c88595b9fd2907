//! Debian's ROS 1 for tests: a real `rosmaster` on a free port and `rostopic` processes, each
//! with its own ROS_HOME so nothing is written to the user's.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{free_port, wait_for};

/// A rosmaster on a free loopback port, killed on drop (and restartable on the same port).
pub struct RosMaster {
    pub port: u16,
    home: tempfile::TempDir,
    child: Option<Child>,
}

impl RosMaster {
    pub fn start() -> RosMaster {
        let mut m = RosMaster { port: free_port(), home: tempfile::tempdir().unwrap(), child: None };
        m.spawn();
        m
    }

    pub fn uri(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// What a ROS process needs to find this master.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ROS_MASTER_URI", self.uri()),
            ("ROS_HOSTNAME", "127.0.0.1".into()),
            ("ROS_HOME", self.home.path().display().to_string()),
            ("ROS_LOG_DIR", self.home.path().join("log").display().to_string()),
        ]
    }

    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env());
        c
    }

    fn spawn(&mut self) {
        let child = self
            .command("rosmaster")
            .args(["--core", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rosmaster (python3-rosmaster) runs");
        self.child = Some(child);
        // Up when it answers XML-RPC, not merely when the port is open.
        wait_for(Duration::from_secs(30), "rosmaster", || self.answers().then_some(()));
    }

    /// Whether `rostopic list` gets an answer.
    pub fn answers(&self) -> bool {
        self.command("rostopic")
            .arg("list")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `rostopic pub -r RATE TOPIC TYPE YAML`, killed on drop.
    pub fn publish(&self, topic: &str, ty: &str, rate_hz: u32, yaml: &str) -> RosProc {
        let child = self
            .command("rostopic")
            .args(["pub", "-r", &rate_hz.to_string(), topic, ty, yaml])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        RosProc { child, lines: Arc::default() }
    }

    /// `rostopic echo TOPIC` (with `-p`, one line a message), its lines collected, killed on
    /// drop.
    pub fn echo(&self, topic: &str) -> RosProc {
        self.echo_with(topic, &[])
    }

    /// `rostopic echo -p` with more options (`--offset`: times as offsets from when rostopic
    /// received the message, in ns).
    pub fn echo_with(&self, topic: &str, options: &[&str]) -> RosProc {
        self.collect(
            self.command("rostopic").args(["echo", "-p"]).args(options).arg(topic).env("PYTHONUNBUFFERED", "1"),
        )
    }

    /// A rospy program (Debian's `/usr/bin/python3 -c`, which has the ROS modules), its output
    /// lines collected, killed on drop.
    pub fn python(&self, program: &str) -> RosProc {
        self.collect(self.command("/usr/bin/python3").args(["-c", program]).env("PYTHONUNBUFFERED", "1"))
    }

    fn collect(&self, cmd: &mut Command) -> RosProc {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        RosProc { child, lines }
    }

    /// `rostopic type TOPIC`.
    pub fn topic_type(&self, topic: &str) -> String {
        let out = self.command("rostopic").args(["type", topic]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RosMaster {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A ROS process of the test.
pub struct RosProc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl RosProc {
    /// What it printed so far (for `echo`: a header line, then one line a message).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for RosProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether Debian's ROS 1 tools are here (the test command installs them).
pub fn available() -> bool {
    Path::new("/usr/bin/rosmaster").exists() && Path::new("/usr/bin/rostopic").exists()
}
