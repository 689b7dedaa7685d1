//! Installing the plugin on a node (the DaemonSet's `cni-install` container): the
//! binary into the runtime's plugin directory, and an entry of type `microseg-cni`
//! at the end of the plugin list of the node's network configuration, so that the
//! runtime runs it after the main plugin made the pod's veth.
//!
//! The network configuration is the one runtimes use for pods: the first file, by
//! name, in the configuration directory with a `.conf`, `.conflist` or `.json`
//! extension (libcni's order, as containerd and CRI-O load it). Only a `.conflist`
//! can chain; a single-plugin file is reported and left alone. The file is
//! rewritten in place (a new file renamed over it), its other keys and plugins
//! kept as they were written, in their order; an entry already there is kept as it
//! is. Uninstalling removes the `microseg-cni` entries and the binary, nothing
//! else.

use std::{
    fmt, fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::{
    Deserialize, Deserializer,
    de::{MapAccess, Visitor},
};
use serde_json::value::RawValue;

/// The plugin's `type`: the executable's name in the plugin directory.
pub const PLUGIN_TYPE: &str = "microseg-cni";

/// The plugin's configuration in the network's list.
#[derive(Clone, Debug)]
pub struct ChainEntry {
    pub socket: PathBuf,
    pub timeout_seconds: f64,
}

impl ChainEntry {
    fn to_json(&self) -> String {
        serde_json::json!({
            "type": PLUGIN_TYPE,
            "socket": self.socket,
            "timeoutSeconds": self.timeout_seconds,
        })
        .to_string()
    }
}

/// Copies `source` to `bin_dir/microseg-cni` unless it is there already with the
/// same bytes; true if it wrote. A new file is renamed into place, so a runtime
/// executing the old one meanwhile is not disturbed.
pub fn install_binary(source: &Path, bin_dir: &Path) -> io::Result<bool> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let wanted = fs::read(source)?;
    if fs::read(&target).is_ok_and(|present| present == wanted) {
        return Ok(false);
    }
    fs::create_dir_all(bin_dir)?;
    let staging = bin_dir.join(format!(".{PLUGIN_TYPE}.new"));
    fs::write(&staging, &wanted)?;
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))?;
    fs::File::open(&staging)?.sync_all()?;
    fs::rename(&staging, &target)?;
    Ok(true)
}

/// Removes `bin_dir/microseg-cni`; true if it was there.
pub fn remove_binary(bin_dir: &Path) -> io::Result<bool> {
    match fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// What [`chain`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chained {
    Inserted(PathBuf),
    AlreadyThere(PathBuf),
}

/// Puts the plugin at the end of the node's network's plugin list, unless an
/// entry of its type is in the list already.
pub fn chain(conf_dir: &Path, entry: &ChainEntry) -> Result<Chained, String> {
    let file = default_network(conf_dir)?.ok_or_else(|| {
        format!(
            "no network configuration in {} yet (the main CNI plugin writes it)",
            conf_dir.display()
        )
    })?;
    if file.extension().is_none_or(|ext| ext != "conflist") {
        return Err(format!(
            "{} is a single-plugin configuration: chaining needs a configuration list (.conflist) naming the main plugin first",
            file.display()
        ));
    }
    let text = read(&file)?;
    let mut list = ConfList::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    if list.has_plugin(PLUGIN_TYPE)? {
        return Ok(Chained::AlreadyThere(file));
    }
    match list.cni_version() {
        Some(version) if crate::spec::is_supported(&version) => {}
        version => {
            return Err(format!(
                "{}: cniVersion {version:?} is not one microseg-cni speaks ({})",
                file.display(),
                crate::spec::SUPPORTED_VERSIONS.join(", ")
            ));
        }
    }
    list.push_plugin(&entry.to_json())?;
    write_over(&file, &list.render())?;
    Ok(Chained::Inserted(file))
}

/// Removes the plugin's entries from every configuration list in `conf_dir`;
/// answers the files changed.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut changed = Vec::new();
    for file in network_files(conf_dir)? {
        if file.extension().is_none_or(|ext| ext != "conflist") {
            continue;
        }
        let text = read(&file)?;
        let Ok(mut list) = ConfList::parse(&text) else {
            continue;
        };
        if list.remove_plugins(PLUGIN_TYPE)? {
            write_over(&file, &list.render())?;
            changed.push(file);
        }
    }
    Ok(changed)
}

fn read(file: &Path) -> Result<String, String> {
    fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))
}

/// The network configuration files in `conf_dir`, in the order runtimes try them.
fn network_files(conf_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("reading {}: {e}", conf_dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "conf" || ext == "conflist" || ext == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The configuration the runtime uses for pods: the first network file by name.
pub fn default_network(conf_dir: &Path) -> Result<Option<PathBuf>, String> {
    Ok(network_files(conf_dir)?.into_iter().next())
}

/// Writes `text` over `file`: a new file beside it (a name runtimes do not load),
/// given the old one's permissions, then renamed over it.
fn write_over(file: &Path, text: &str) -> Result<(), String> {
    let failed = |e: io::Error| format!("writing {}: {e}", file.display());
    let staging = file.with_file_name(format!(".{PLUGIN_TYPE}.tmp"));
    let permissions = fs::metadata(file).map_err(failed)?.permissions();
    fs::write(&staging, text).map_err(failed)?;
    fs::set_permissions(&staging, permissions).map_err(failed)?;
    fs::File::open(&staging)
        .and_then(|f| f.sync_all())
        .map_err(failed)?;
    fs::rename(&staging, file).map_err(failed)
}

/// A configuration list with its top-level keys in their order and every value
/// as it was written.
struct ConfList {
    entries: Vec<(String, Box<RawValue>)>,
}

impl ConfList {
    fn parse(text: &str) -> Result<Self, String> {
        let object: OrderedObject = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let list = Self { entries: object.0 };
        list.plugins()?;
        Ok(list)
    }

    fn get(&self, key: &str) -> Option<&RawValue> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    fn cni_version(&self) -> Option<String> {
        serde_json::from_str(self.get("cniVersion")?.get()).ok()
    }

    fn plugins(&self) -> Result<Vec<Box<RawValue>>, String> {
        let plugins = self.get("plugins").ok_or("no \"plugins\" list")?;
        serde_json::from_str(plugins.get()).map_err(|e| format!("\"plugins\": {e}"))
    }

    fn set_plugins(&mut self, plugins: &[Box<RawValue>]) -> Result<(), String> {
        let items: Vec<&str> = plugins.iter().map(|plugin| plugin.get()).collect();
        let text = format!("[\n    {}\n  ]", items.join(",\n    "));
        let value = RawValue::from_string(text).map_err(|e| e.to_string())?;
        if let Some((_, slot)) = self.entries.iter_mut().find(|(k, _)| k == "plugins") {
            *slot = value;
        }
        Ok(())
    }

    fn is_of_type(plugin: &RawValue, plugin_type: &str) -> bool {
        #[derive(Deserialize)]
        struct Typed {
            #[serde(rename = "type", default)]
            plugin_type: String,
        }
        serde_json::from_str::<Typed>(plugin.get()).is_ok_and(|p| p.plugin_type == plugin_type)
    }

    fn has_plugin(&self, plugin_type: &str) -> Result<bool, String> {
        Ok(self
            .plugins()?
            .iter()
            .any(|plugin| Self::is_of_type(plugin, plugin_type)))
    }

    fn push_plugin(&mut self, plugin: &str) -> Result<(), String> {
        let mut plugins = self.plugins()?;
        plugins.push(RawValue::from_string(plugin.to_owned()).map_err(|e| e.to_string())?);
        self.set_plugins(&plugins)
    }

    /// True if any was removed.
    fn remove_plugins(&mut self, plugin_type: &str) -> Result<bool, String> {
        let plugins = self.plugins()?;
        let kept: Vec<Box<RawValue>> = plugins
            .iter()
            .filter(|plugin| !Self::is_of_type(plugin, plugin_type))
            .cloned()
            .collect();
        if kept.len() == plugins.len() {
            return Ok(false);
        }
        self.set_plugins(&kept)?;
        Ok(true)
    }

    fn render(&self) -> String {
        let entries: Vec<String> = self
            .entries
            .iter()
            .map(|(key, value)| {
                format!(
                    "  {}: {}",
                    serde_json::Value::from(key.as_str()),
                    value.get()
                )
            })
            .collect();
        format!("{{\n{}\n}}\n", entries.join(",\n"))
    }
}

/// A JSON object's members in the order written, values unparsed.
struct OrderedObject(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(OrderedObject(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALICO_LIKE: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "mtu": 1440,
      "ipam": {"type": "calico-ipam"},
      "policy": {"type": "k8s"}
    },
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}
"#;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "microseg-cni-install-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entry() -> ChainEntry {
        ChainEntry {
            socket: "/run/microseg/microseg.sock".into(),
            timeout_seconds: 30.0,
        }
    }

    fn plugins(file: &Path) -> Vec<serde_json::Value> {
        let value: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(file).unwrap()).unwrap();
        value["plugins"].as_array().unwrap().clone()
    }

    #[test]
    fn the_plugin_is_chained_last_once_and_unchained_leaving_the_rest_as_it_was() {
        let dir = temp_dir("chain");
        let file = dir.join("10-calico.conflist");
        fs::write(&file, CALICO_LIKE).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        // Later by name: not the default network.
        fs::write(dir.join("99-loopback.conf"), r#"{"type":"loopback"}"#).unwrap();

        assert_eq!(
            chain(&dir, &entry()).unwrap(),
            Chained::Inserted(file.clone())
        );
        let chained = plugins(&file);
        assert_eq!(chained.len(), 3);
        assert_eq!(chained[0]["type"], "calico");
        assert_eq!(chained[1]["type"], "portmap");
        assert_eq!(
            chained[2],
            serde_json::json!({"type": "microseg-cni", "socket": "/run/microseg/microseg.sock", "timeoutSeconds": 30.0})
        );
        let text = fs::read_to_string(&file).unwrap();
        // The other keys in their order, the other plugins as they were written.
        assert!(text.starts_with(
            "{\n  \"name\": \"k8s-pod-network\",\n  \"cniVersion\": \"0.3.1\",\n  \"plugins\": ["
        ));
        assert!(text.contains(
            r#"{"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}"#
        ));
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o640
        );

        // Idempotent.
        assert_eq!(
            chain(&dir, &entry()).unwrap(),
            Chained::AlreadyThere(file.clone())
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), text);

        assert_eq!(unchain(&dir).unwrap(), std::slice::from_ref(&file));
        let unchained: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        let original: serde_json::Value = serde_json::from_str(CALICO_LIKE).unwrap();
        assert_eq!(unchained, original);
        assert!(unchain(&dir).unwrap().is_empty());
        assert_eq!(
            fs::read_to_string(dir.join("99-loopback.conf")).unwrap(),
            r#"{"type":"loopback"}"#
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_cannot_chain_is_refused_and_left_alone() {
        let dir = temp_dir("refuse");
        assert!(
            chain(&dir, &entry())
                .unwrap_err()
                .contains("no network configuration")
        );
        let single = dir.join("10-bridge.conf");
        fs::write(&single, r#"{"cniVersion":"1.0.0","type":"bridge"}"#).unwrap();
        assert!(chain(&dir, &entry()).unwrap_err().contains("single-plugin"));
        fs::remove_file(&single).unwrap();
        let old = dir.join("10-old.conflist");
        let text = r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}"#;
        fs::write(&old, text).unwrap();
        assert!(chain(&dir, &entry()).unwrap_err().contains("0.2.0"));
        assert_eq!(fs::read_to_string(&old).unwrap(), text);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_binary_is_copied_when_it_differs_and_removed() {
        let dir = temp_dir("binary");
        let source = dir.join("source");
        fs::write(&source, b"#!/bin/true\n").unwrap();
        let bin = dir.join("bin");
        assert!(install_binary(&source, &bin).unwrap());
        assert!(!install_binary(&source, &bin).unwrap());
        let installed = bin.join(PLUGIN_TYPE);
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        fs::write(&source, b"#!/bin/false\n").unwrap();
        assert!(install_binary(&source, &bin).unwrap());
        assert_eq!(fs::read(&installed).unwrap(), b"#!/bin/false\n");
        assert!(remove_binary(&bin).unwrap());
        assert!(!remove_binary(&bin).unwrap());
        let _ = fs::remove_dir_all(&dir);
    }
}
