//! Message types: definitions found in the search path (Debian's ROS packages put them in
//! `/usr/share/PKG/msg/NAME.msg`) or built in, with what the wire needs computed from them —
//! the md5sum (over the definition and its dependencies' sums, as ROS defines it) and the full
//! definition text (`gendeps --cat`) that publishers send in their connection header.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use md5::{Digest, Md5};
use ros_message::{MessagePath, Msg};
use rosrust::DynamicMsg;

/// One message type, ready to encode and decode.
pub struct MsgType {
    pub name: String,
    pub md5sum: String,
    /// The definition with every dependency after it, as `gendeps --cat` prints it.
    pub definition: String,
    pub codec: DynamicMsg,
}

impl std::fmt::Debug for MsgType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.md5sum)
    }
}

const BUILTIN: &[(&str, &str)] = &[
    ("std_msgs/Header", include_str!("../msg/std_msgs/Header.msg")),
    ("std_msgs/String", include_str!("../msg/std_msgs/String.msg")),
    ("std_msgs/Bool", include_str!("../msg/std_msgs/Bool.msg")),
    ("std_msgs/Float64", include_str!("../msg/std_msgs/Float64.msg")),
    ("std_msgs/Int32", include_str!("../msg/std_msgs/Int32.msg")),
    ("std_msgs/Empty", include_str!("../msg/std_msgs/Empty.msg")),
    ("geometry_msgs/Twist", include_str!("../msg/geometry_msgs/Twist.msg")),
    ("geometry_msgs/Vector3", include_str!("../msg/geometry_msgs/Vector3.msg")),
    ("geometry_msgs/Point", include_str!("../msg/geometry_msgs/Point.msg")),
    ("geometry_msgs/Quaternion", include_str!("../msg/geometry_msgs/Quaternion.msg")),
    ("geometry_msgs/Pose", include_str!("../msg/geometry_msgs/Pose.msg")),
    ("geometry_msgs/PoseWithCovariance", include_str!("../msg/geometry_msgs/PoseWithCovariance.msg")),
    ("geometry_msgs/TwistWithCovariance", include_str!("../msg/geometry_msgs/TwistWithCovariance.msg")),
    ("nav_msgs/Odometry", include_str!("../msg/nav_msgs/Odometry.msg")),
    ("sensor_msgs/BatteryState", include_str!("../msg/sensor_msgs/BatteryState.msg")),
    ("sensor_msgs/Image", include_str!("../msg/sensor_msgs/Image.msg")),
];

const BUILTIN_SRV: &[(&str, &str)] = &[
    ("std_srvs/Empty", include_str!("../msg/std_srvs/Empty.srv")),
    ("std_srvs/SetBool", include_str!("../msg/std_srvs/SetBool.srv")),
    ("std_srvs/Trigger", include_str!("../msg/std_srvs/Trigger.srv")),
];

/// A service type: its request and response as message types, and the service's md5sum.
#[derive(Debug)]
pub struct SrvType {
    pub name: String,
    pub md5sum: String,
    pub request: MsgType,
    pub response: MsgType,
}

/// A type name as ROS writes it: `package/Name`.
pub fn parse_name(name: &str) -> Result<MessagePath, String> {
    let (pkg, msg) = name.split_once('/').ok_or_else(|| format!("{name:?} is not PACKAGE/Type"))?;
    let ok = |s: &str| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok(pkg) || !ok(msg) || !msg.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!("{name:?} is not a ROS message type (PACKAGE/Type)"));
    }
    MessagePath::new(pkg, msg).map_err(|e| format!("{name}: {e}"))
}

/// Where definitions come from, and the types already resolved.
pub struct Registry {
    dirs: Vec<PathBuf>,
    cache: HashMap<String, Arc<MsgType>>,
}

impl Registry {
    pub fn new(dirs: Vec<PathBuf>) -> Registry {
        Registry { dirs, cache: HashMap::new() }
    }

    /// The type, with its dependencies, or what is missing or wrong.
    pub fn get(&mut self, name: &str) -> Result<Arc<MsgType>, String> {
        if let Some(t) = self.cache.get(name) {
            return Ok(t.clone());
        }
        let path = parse_name(name)?;
        // Every type this one needs, each once, dependencies before dependents.
        let mut order: Vec<Msg> = Vec::new();
        self.collect(&path, &mut order, &mut Vec::new())?;
        let (t, _) = Self::assemble(name, order)?;
        let t = Arc::new(t);
        self.cache.insert(name.to_owned(), t.clone());
        Ok(t)
    }

    /// A service type: `PKG/srv/NAME.srv` in the search path, or built in; its halves are
    /// the messages `NAMERequest` and `NAMEResponse`, and its md5sum covers both.
    pub fn service(&mut self, name: &str) -> Result<SrvType, String> {
        let path = parse_name(name)?;
        let source = self.srv_source(&path)?;
        let lines: Vec<&str> = source.lines().collect();
        let mut halves: Vec<String> = lines.split(|l| l.trim_end() == "---").map(|ls| ls.join("\n")).collect();
        if halves.len() != 2 {
            return Err(format!("{name}: a service definition is a request, a line ---, and a response"));
        }
        let response_src = halves.pop().unwrap_or_default();
        let request_src = halves.pop().unwrap_or_default();
        let mut reprs = String::new();
        let mut built = Vec::new();
        for (suffix, src) in [("Request", request_src), ("Response", response_src)] {
            let half =
                MessagePath::new(path.package(), format!("{}{suffix}", path.name())).map_err(|e| e.to_string())?;
            let msg = Msg::new(half.clone(), &src).map_err(|e| format!("{half}: {e}"))?;
            let mut order = Vec::new();
            for dep in msg.dependencies() {
                self.collect(&dep, &mut order, &mut vec![half.clone()])?;
            }
            order.push(msg);
            let (t, sums) = Self::assemble(&half.to_string(), order)?;
            let main = t.codec.msg();
            reprs.push_str(&main.get_md5_representation(&sums).map_err(|e| format!("{half}: {e}"))?);
            built.push(t);
        }
        let response = built.pop().ok_or("no response")?;
        let request = built.pop().ok_or("no request")?;
        Ok(SrvType { name: name.to_owned(), md5sum: hex(&Md5::digest(reprs.as_bytes())), request, response })
    }

    /// A type from its definitions, dependencies first: md5sums and the full definition.
    fn assemble(name: &str, order: Vec<Msg>) -> Result<(MsgType, HashMap<MessagePath, String>), String> {
        let mut sums: HashMap<MessagePath, String> = HashMap::new();
        for m in &order {
            let repr = m.get_md5_representation(&sums).map_err(|e| format!("{}: {e}", m.path()))?;
            sums.insert(m.path().clone(), hex(&Md5::digest(repr.as_bytes())));
        }
        let main = order.last().ok_or("no definition")?;
        let md5sum = sums[main.path()].clone();
        let mut definition = main.source().trim_end().to_owned();
        definition.push('\n');
        // gendeps --cat: the dependencies, each once, in the order they are first needed.
        for dep in order.iter().rev().skip(1) {
            definition.push_str(&"=".repeat(80));
            definition.push_str(&format!("\nMSG: {}\n", dep.path()));
            definition.push_str(dep.source().trim_end());
            definition.push('\n');
        }
        let codec = DynamicMsg::new(name, &definition).map_err(|e| format!("{name}: {e}"))?;
        Ok((MsgType { name: name.to_owned(), md5sum, definition, codec }, sums))
    }

    fn collect(&self, path: &MessagePath, order: &mut Vec<Msg>, stack: &mut Vec<MessagePath>) -> Result<(), String> {
        if order.iter().any(|m| m.path() == path) {
            return Ok(());
        }
        if stack.contains(path) || stack.len() > 32 {
            return Err(format!("{path}: its definition includes itself"));
        }
        let source = self.source(path)?;
        let msg = Msg::new(path.clone(), &source).map_err(|e| format!("{path}: {e}"))?;
        stack.push(path.clone());
        for dep in msg.dependencies() {
            self.collect(&dep, order, stack)?;
        }
        stack.pop();
        order.push(msg);
        Ok(())
    }

    fn source(&self, path: &MessagePath) -> Result<String, String> {
        self.find(path, "msg", BUILTIN)
    }

    fn srv_source(&self, path: &MessagePath) -> Result<String, String> {
        self.find(path, "srv", BUILTIN_SRV)
    }

    /// `PKG/KIND/NAME.KIND`: an installed definition first (it is what the robot's own nodes
    /// were built with), then the built-in one.
    fn find(&self, path: &MessagePath, kind: &str, builtin: &[(&str, &str)]) -> Result<String, String> {
        for dir in &self.dirs {
            let file = dir.join(path.package()).join(kind).join(format!("{}.{kind}", path.name()));
            match std::fs::read_to_string(&file) {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", file.display())),
            }
        }
        let name = path.to_string();
        builtin.iter().find(|(n, _)| *n == name).map(|(_, s)| (*s).to_owned()).ok_or_else(|| {
            let looked: Vec<String> = self.dirs.iter().map(|d| display(d)).collect();
            format!(
                "no definition of {name}: not built in, and no {}/{kind}/{}.{kind} under {}",
                path.package(),
                path.name(),
                if looked.is_empty() { "any msg_paths".to_owned() } else { looked.join(", ") }
            )
        })
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_types_have_the_md5sums_ros_publishes() {
        // The sums `rosmsg md5` prints for these types (Noetic, Debian bookworm).
        let mut r = Registry::new(Vec::new());
        for (name, sum) in [
            ("std_msgs/String", "992ce8a1687cec8c8bd883ec73ca41d1"),
            ("geometry_msgs/Twist", "9f195f881246fdfa2798d1d3eebca84a"),
            ("nav_msgs/Odometry", "cd5e73d190d741a2f92e81eda573aca7"),
            ("sensor_msgs/BatteryState", "4ddae7f048e32fda22cac764685e3974"),
            ("sensor_msgs/Image", "060021388200f6f0f447d0fcd9c64743"),
        ] {
            assert_eq!(r.get(name).unwrap().md5sum, sum, "{name}");
        }
        // Services: the sums `rossrv md5` prints.
        assert_eq!(r.service("std_srvs/SetBool").unwrap().md5sum, "09fb03525b03e7ea1fd3992bafd87e16");
        assert_eq!(r.service("std_srvs/Trigger").unwrap().md5sum, "937c9679a518e3a18d831e57125ea522");
        assert_eq!(r.service("std_srvs/Empty").unwrap().md5sum, "d41d8cd98f00b204e9800998ecf8427e");
        let odom = r.get("nav_msgs/Odometry").unwrap();
        assert!(odom.definition.contains("\nMSG: geometry_msgs/PoseWithCovariance\n"), "{}", odom.definition);
        assert_eq!(odom.definition.matches("MSG: geometry_msgs/Vector3").count(), 1);
    }

    #[test]
    fn definitions_from_the_search_path_and_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("robot_msgs/msg")).unwrap();
        std::fs::write(
            dir.path().join("robot_msgs/msg/Beep.msg"),
            "uint8 LOUD=2\nuint8 level\ngeometry_msgs/Point at\n",
        )
        .unwrap();
        let mut r = Registry::new(vec![dir.path().to_owned()]);
        let t = r.get("robot_msgs/Beep").unwrap();
        assert!(t.definition.starts_with("uint8 LOUD=2\nuint8 level\n"), "{}", t.definition);
        std::fs::create_dir_all(dir.path().join("robot_msgs/srv")).unwrap();
        std::fs::write(dir.path().join("robot_msgs/srv/Ring.srv"), "robot_msgs/Beep beep\n---\nbool done\n").unwrap();
        let ring = r.service("robot_msgs/Ring").unwrap();
        assert!(ring.request.definition.contains("\nMSG: robot_msgs/Beep\n"), "{}", ring.request.definition);
        assert!(r.service("robot_msgs/Gone").unwrap_err().contains("no robot_msgs/srv/Gone.srv"));
        let e = r.get("robot_msgs/Missing").unwrap_err();
        assert!(e.contains("no definition of robot_msgs/Missing"), "{e}");
        for bad in ["Twist", "geometry_msgs/", "../x/y", "a/b/c", "geometry_msgs/Tw ist"] {
            assert!(r.get(bad).is_err(), "{bad}");
        }
        std::fs::write(dir.path().join("robot_msgs/msg/Loop.msg"), "robot_msgs/Loop next\n").unwrap();
        assert!(r.get("robot_msgs/Loop").unwrap_err().contains("includes itself"));
    }
}
