//! The deploy files are checked by the tools their platform uses: `systemd-analyze verify` for the
//! systemd units (deploy/systemd), `kubernetes-validate` for the Kubernetes manifests
//! (deploy/kubernetes), and docker or podman for the `Containerfile` where one runs with the base
//! images at hand. The configs next to the units are parsed by the unit tests of `src/config.rs`
//! and `integration-node/src/settings.rs`, like every config under deploy/; the `cluster.toml`
//! inside the Kubernetes ConfigMap is parsed here, with the servers' own loader.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ferrocotta::config::ClusterConfig;

/// Whether `systemd-analyze` runs here (see `common::tool_available`).
fn systemd_analyze_available() -> bool {
    common::tool_available(
        "systemd-analyze",
        ".ci/run installs Debian's systemd",
        "the systemd units were",
    )
}

/// Copies the template units into `dir`, their `ExecStart` pointed at the binaries of this build
/// (verify checks that the command exists and is executable).
fn units_with_built_binaries(dir: &Path) -> Vec<String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let mut instances = Vec::new();
    for (unit, binary, instance) in [
        ("cache-array@.service", "cache-array", "a1"),
        ("integration-node@.service", "integration-node", "node1"),
    ] {
        let text = std::fs::read_to_string(source.join(unit)).unwrap();
        let installed = format!("/usr/local/bin/{binary} ");
        assert!(text.contains(&installed), "{unit} runs {installed}");
        let built = common::binary(binary);
        let text = text.replace(&installed, &format!("{} ", built.display()));
        std::fs::write(dir.join(unit), text).unwrap();
        instances.push(
            dir.join(unit.replace("@.", &format!("@{instance}.")))
                .display()
                .to_string(),
        );
    }
    instances
}

/// Runs verify on the instances; its complaints (stderr), or `None` when it has none.
fn verify(instances: &[String], dir: &Path) -> Option<String> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(instances)
        .current_dir(dir)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (!out.status.success() || !complaints.is_empty()).then(|| format!("exit {:?}: {complaints}", out.status.code()))
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !systemd_analyze_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let instances = units_with_built_binaries(dir.path());
    if let Some(complaints) = verify(&instances, dir.path()) {
        panic!("systemd-analyze verify complains about deploy/systemd: {complaints}");
    }

    // The check can fail: a unit with a bad setting, or a command that is not there, is caught.
    let unit = dir.path().join("cache-array@.service");
    let good = std::fs::read_to_string(&unit).unwrap();
    for (what, planted) in [
        (
            "a bad Restart=",
            good.replace("Restart=on-failure", "Restart=sometimes"),
        ),
        (
            "a missing binary",
            good.replace("/cache-array --config", "/no-such-binary --config"),
        ),
    ] {
        std::fs::write(&unit, planted).unwrap();
        assert!(verify(&instances, dir.path()).is_some(), "verify missed {what}");
    }
}

#[test]
fn systemd_units_hold_the_promised_settings() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    for unit in ["cache-array@.service", "integration-node@.service"] {
        let text = std::fs::read_to_string(source.join(unit)).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for setting in [
            "User=ferrocotta",
            "StateDirectory=ferrocotta",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=",
        ] {
            assert!(lines.contains(&setting), "{unit} lacks {setting}");
        }
        assert!(
            lines.iter().any(|l| l.starts_with("TimeoutStopSec=")),
            "{unit} bounds its stop"
        );
    }
}

/// The Kubernetes version the manifests are validated against. kubernetes-validate 1.37.0 ships
/// the schemas of Kubernetes 1.25 to 1.37. 1.33 is old enough that the manifests rely on nothing
/// newer, and recent enough that a later kubernetes-validate still ships its schemas.
const KUBERNETES_VERSION: &str = "1.33.0";

/// deploy/kubernetes.
fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// Every manifest under deploy/kubernetes, `secrets/` included, in name order.
fn kubernetes_manifests() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut folders = vec![kubernetes_dir()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Whether `kubernetes-validate` runs here (see `common::tool_available`).
fn kubernetes_validate_available() -> bool {
    common::tool_available(
        "kubernetes-validate",
        "install it with `pip install kubernetes-validate==1.37.0` (.ci/run does)",
        "the Kubernetes manifests were",
    )
}

/// The resources in a manifest: its top-level `kind:` lines.
fn resources_in(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("kind:"))
        .count()
}

/// Runs `kubernetes-validate --strict` on `files`: its complaints, or `None` when every resource
/// passed. The tool reports a resource it has no schema for (a misspelt kind or apiVersion) as a
/// warning and exits 0. Here that is a complaint, and so is any resource that did not pass,
/// because otherwise such a resource would not be checked at all.
fn kubernetes_validate(files: &[PathBuf]) -> Option<String> {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let passed = stdout
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    let complaints: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("INFO ")).collect();
    let resources: usize = files.iter().map(|f| resources_in(f.as_path())).sum();
    if out.status.success() && complaints.is_empty() && passed == resources {
        return None;
    }
    Some(format!(
        "exit {:?}, {passed} of {resources} resources passed:\n{}\n{}",
        out.status.code(),
        complaints.join("\n"),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

#[test]
fn kubernetes_manifests_pass_the_schemas() {
    if !kubernetes_validate_available() {
        return;
    }
    let manifests = kubernetes_manifests();
    assert!(
        manifests.len() >= 7,
        "expected the namespace, ConfigMap, Services, StatefulSets, budgets, Deployment and Secrets: {manifests:?}"
    );
    if let Some(complaints) = kubernetes_validate(&manifests) {
        panic!("kubernetes-validate complains about deploy/kubernetes (Kubernetes {KUBERNETES_VERSION}): {complaints}");
    }

    // The check can fail: a misspelt field (strict mode), a value of the wrong type, and a kind
    // the schemas do not know are each caught.
    let dir = tempfile::tempdir().unwrap();
    let array = std::fs::read_to_string(kubernetes_dir().join("30-array.yaml")).unwrap();
    let planted = dir.path().join("30-array.yaml");
    for (what, text) in [
        (
            "a misspelt field",
            array.replace("  podManagementPolicy: Parallel", "  podManagementPolicies: Parallel"),
        ),
        (
            "a value of the wrong type",
            array.replace("  replicas: 3", "  replicas: three"),
        ),
        (
            "a kind with no schema",
            array.replace("kind: StatefulSet", "kind: StatefulSett"),
        ),
    ] {
        assert_ne!(text, array, "{what} was not planted: 30-array.yaml changed");
        std::fs::write(&planted, text).unwrap();
        assert!(
            kubernetes_validate(std::slice::from_ref(&planted)).is_some(),
            "kubernetes-validate missed {what}"
        );
    }
}

/// The literal block `key: |` of a YAML document, without its indentation, read by indentation
/// alone: the block is every line after the key that is blank or indented at least as far as its
/// first line. `None` when the key or its block is missing.
fn yaml_literal_block(yaml: &str, key: &str) -> Option<String> {
    let header = format!("{key}: |");
    let mut lines = yaml.lines();
    let header_line = lines.by_ref().find(|l| l.trim() == header)?;
    let header_indent = indentation(header_line);
    let mut block_indent = None;
    let mut block = String::new();
    for line in lines {
        if line.trim().is_empty() {
            block.push('\n');
            continue;
        }
        let this = indentation(line);
        let indent = *block_indent.get_or_insert(this);
        if this < indent || this <= header_indent {
            break;
        }
        block.push_str(&line[indent..]);
        block.push('\n');
    }
    block_indent.filter(|&i| i > header_indent).map(|_| block)
}

/// Leading spaces of a line.
fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The documents of a YAML file that hold a resource (split at `---` lines).
fn yaml_documents(text: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            documents.push(String::new());
        } else if let Some(last) = documents.last_mut() {
            last.push_str(line);
            last.push('\n');
        }
    }
    documents.retain(|d| d.lines().any(|l| l.starts_with("kind:")));
    documents
}

/// The value of `key` at `indent` spaces in a YAML document (0: `kind`; 2: a field of
/// `metadata` or `spec`), the first if there are several, quotes removed.
fn yaml_field<'a>(document: &'a str, indent: usize, key: &str) -> Option<&'a str> {
    let prefix = format!("{}{key}: ", " ".repeat(indent));
    document
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim().trim_matches('"'))
}

/// The resource of `kind` named `name` among `documents`.
fn resource<'a>(documents: &'a [String], kind: &str, name: &str) -> &'a str {
    documents
        .iter()
        .map(String::as_str)
        .find(|d| yaml_field(d, 0, "kind") == Some(kind) && yaml_field(d, 2, "name") == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The number `field` (`port`, `containerPort`) of the list item `- name: NAME` in a YAML
/// document: the item's lines are those indented past its dash.
fn named_port(document: &str, name: &str, field: &str) -> Option<u16> {
    let lines: Vec<&str> = document.lines().collect();
    let item = format!("- name: {name}");
    let start = lines.iter().position(|l| l.trim() == item)?;
    let dash = indentation(lines[start]);
    let prefix = format!("{field}: ");
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indentation(l) > dash)
        .find_map(|l| l.trim().strip_prefix(prefix.as_str())?.parse().ok())
}

/// Lines of a YAML document that are exactly `text` once trimmed.
fn lines_equal(document: &str, text: &str) -> usize {
    document.lines().filter(|l| l.trim() == text).count()
}

/// The `cluster.toml` in the ConfigMap is the document the servers load. The manifests depend on
/// what it says: one StatefulSet per stripe, with its servers as pods. Each server's name is its
/// pod's name and its host is the pod's name in the headless Service. Its ports are the ones the
/// containers, the Services and the probes use. A server whose name, host or port disagrees with
/// its pod does not start, or starts where nobody looks for it. The files it names are under the
/// paths where its Secrets and volume are mounted.
#[test]
fn kubernetes_configmap_cluster_toml_parses_with_the_project_loader() {
    let dir = kubernetes_dir();
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
    let configmap = read("10-configmap.yaml");
    let text = yaml_literal_block(&configmap, "cluster.toml").expect("10-configmap.yaml has a `cluster.toml: |` block");
    let config = ClusterConfig::parse(&text).unwrap_or_else(|e| panic!("cluster.toml in 10-configmap.yaml: {e}"));

    let namespace = "ferrocotta";
    resource(&yaml_documents(&read("00-namespace.yaml")), "Namespace", namespace);
    let services = yaml_documents(&read("20-services.yaml"));
    let peers = resource(&services, "Service", "ferrocotta-peers");
    let client = resource(&services, "Service", "ferrocotta-client");
    let admin = resource(&services, "Service", "ferrocotta-admin");
    assert_eq!(
        yaml_field(peers, 2, "clusterIP"),
        Some("None"),
        "ferrocotta-peers is headless"
    );
    assert_eq!(
        yaml_field(peers, 2, "publishNotReadyAddresses"),
        Some("true"),
        "servers must find each other by name before they are ready"
    );
    let statefulsets: Vec<String> = yaml_documents(&read("30-array.yaml"))
        .into_iter()
        .filter(|d| yaml_field(d, 0, "kind") == Some("StatefulSet"))
        .collect();

    assert_eq!(config.stripes.len(), 2, "two stripes");
    assert_eq!(statefulsets.len(), config.stripes.len(), "one StatefulSet per stripe");
    for (stripe, set) in config.stripes.iter().zip(statefulsets.iter().map(String::as_str)) {
        let set_name = yaml_field(set, 2, "name").expect("the StatefulSet's name");
        assert_eq!(stripe.servers.len(), 3, "{}: three servers", stripe.name);
        let replicas: usize = yaml_field(set, 2, "replicas")
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("{set_name}: replicas"));
        assert_eq!(
            replicas,
            stripe.servers.len(),
            "{set_name}: a pod per server of {}",
            stripe.name
        );
        assert_eq!(
            yaml_field(set, 2, "serviceName"),
            Some("ferrocotta-peers"),
            "{set_name}"
        );
        assert_eq!(
            yaml_field(set, 2, "podManagementPolicy"),
            Some("Parallel"),
            "{set_name}: a stripe is founded only when all its servers run"
        );
        assert!(
            set.contains(&format!("ferrocotta/stripe: {}", stripe.name)),
            "{set_name} is labelled with its stripe {}",
            stripe.name
        );
        assert!(
            set.contains(r#"args: ["--config", "/etc/ferrocotta/cluster.toml", "--name", "$(POD_NAME)"]"#),
            "{set_name}: each server runs under its pod's name"
        );
        for (ordinal, server) in stripe.servers.iter().enumerate() {
            let pod = format!("{set_name}-{ordinal}");
            assert_eq!(server.name, pod, "{}: server {ordinal} is pod {pod}", stripe.name);
            assert_eq!(
                server.host,
                format!("{pod}.ferrocotta-peers.{namespace}.svc.cluster.local"),
                "{pod}: its host is its name in the headless Service"
            );
            for (port_name, port) in [
                ("client", server.port),
                ("group", server.group_port),
                ("admin", server.admin_port),
            ] {
                assert_eq!(
                    named_port(set, port_name, "containerPort"),
                    Some(port),
                    "{pod}: container port {port_name}"
                );
                assert_eq!(
                    named_port(peers, port_name, "port"),
                    Some(port),
                    "ferrocotta-peers port {port_name}"
                );
            }
            assert_eq!(
                named_port(client, "client", "port"),
                Some(server.port),
                "ferrocotta-client"
            );
            assert_eq!(
                named_port(admin, "admin", "port"),
                Some(server.admin_port),
                "ferrocotta-admin"
            );
            assert_eq!(
                server.data_dir.parent(),
                Some(Path::new("/var/lib/ferrocotta")),
                "{pod}: the data folder is one level inside the volume"
            );
        }
        // Startup and liveness on /livez, readiness on /healthz: all three on the admin port
        // (checked above to be the server's admin_port), over HTTPS since TLS is on.
        assert_eq!(
            lines_equal(set, "port: admin"),
            3,
            "{set_name}: three probes on the admin port"
        );
        assert_eq!(
            lines_equal(set, "scheme: HTTPS"),
            3,
            "{set_name}: the probes speak HTTPS"
        );
        assert_eq!(lines_equal(set, "path: /livez"), 2, "{set_name}: startup and liveness");
        assert_eq!(lines_equal(set, "path: /healthz"), 1, "{set_name}: readiness");
        for mount in [
            "mountPath: /var/lib/ferrocotta",
            "mountPath: /etc/ferrocotta/cluster.toml",
            "mountPath: /etc/ferrocotta/secrets",
            "mountPath: /etc/ferrocotta/tls",
        ] {
            assert_eq!(lines_equal(set, mount), 1, "{set_name}: {mount}");
        }
    }

    let security = &config.security;
    for (field, path) in [
        ("secret_file", security.secret_file.as_deref()),
        ("peer_secret_file", security.peer_secret_file.as_deref()),
    ] {
        assert!(
            path.is_some_and(|p| p.starts_with("/etc/ferrocotta/secrets")),
            "security.{field} is in the Secret ferrocotta-secrets: {path:?}"
        );
    }
    let tls = security.tls.as_ref().expect("TLS is on: the probes use HTTPS");
    for (field, path) in [
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
        ("ca_file", &tls.ca_file),
    ] {
        assert!(
            path.starts_with("/etc/ferrocotta/tls"),
            "security.tls.{field} is in the Secret ferrocotta-tls: {}",
            path.display()
        );
    }

    // node.toml: the integration node's parser is not reachable from this package (the root
    // crate depends on neither program, and integration-node is no dev-dependency of it), so
    // only its URL list is checked here: every server, at the client port of cluster.toml.
    let node_toml = yaml_literal_block(&configmap, "node.toml").expect("10-configmap.yaml has a `node.toml: |` block");
    let urls = node_toml
        .lines()
        .find_map(|l| l.strip_prefix("array_urls = "))
        .expect("node.toml sets array_urls")
        .trim_matches('"');
    let expected: Vec<String> = config.servers().map(|(_, s)| s.client_addr()).collect();
    assert_eq!(
        urls.split(',').map(str::to_string).collect::<Vec<String>>(),
        expected,
        "node.toml lists every server"
    );
}

/// The instructions of a Containerfile as (KEYWORD, arguments): comments and blank lines
/// dropped, continued lines joined.
fn containerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, arguments) = current.split_once(' ').unwrap_or((current.as_str(), ""));
        instructions.push((keyword.to_ascii_uppercase(), arguments.trim().to_string()));
        current.clear();
    }
    instructions
}

/// The arguments of every `keyword` instruction, in order.
fn instruction_arguments<'a>(instructions: &'a [(String, String)], keyword: &str) -> Vec<&'a str> {
    instructions
        .iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, arguments)| arguments.as_str())
        .collect()
}

/// The binaries of the workspace's packages, and the workspace's rust-version, from
/// `cargo metadata`.
fn workspace_binaries_and_rust_version() -> (Vec<String>, String) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = metadata["packages"].as_array().expect("packages");
    let mut binaries = Vec::new();
    for package in packages {
        for target in package["targets"].as_array().expect("targets") {
            let kinds = target["kind"].as_array().expect("target kinds");
            if kinds.iter().any(|k| k.as_str() == Some("bin")) {
                binaries.push(target["name"].as_str().expect("target name").to_string());
            }
        }
    }
    let rust_version = packages
        .iter()
        .find(|p| p["name"].as_str() == Some("ferrocotta"))
        .and_then(|p| p["rust_version"].as_str())
        .expect("the workspace declares rust-version")
        .to_string();
    (binaries, rust_version)
}

/// The first container tool whose `info` succeeds (its daemon or service runs), or why none does.
fn container_tool() -> Result<&'static str, String> {
    let mut why = Vec::new();
    for tool in ["docker", "podman"] {
        match Command::new(tool).arg("info").output() {
            Ok(out) if out.status.success() => return Ok(tool),
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
                why.push(format!("`{tool} info` exit {:?}: {}", out.status.code(), last.trim()));
            }
            Err(e) => why.push(format!("{tool}: {e}")),
        }
    }
    Err(why.join("; "))
}

/// The last `lines` lines of a tool's output.
fn tail(output: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(output);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes the test's image when the test ends, also when it fails.
struct RemoveImage {
    /// docker or podman.
    tool: &'static str,
    /// The image's tag.
    tag: String,
}

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new(self.tool)
            .args(["image", "rm", "-f", self.tag.as_str()])
            .output();
    }
}

/// The Containerfile keeps its promises: two stages, of which the build one uses the workspace's
/// rust-version; a numeric non-root user; a HEALTHCHECK whose URL can be overridden; and only
/// binaries of the workspace copied into the image, all three programs among them. These are
/// checked as text, everywhere. Where docker or podman runs and both base images are already
/// present, the image is also built and its programs run in it as user 10001. Elsewhere that
/// part is skipped loudly, also in CI (the build fetches crates from the network and takes
/// minutes).
#[test]
fn containerfile_builds_where_a_container_tool_and_base_images_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("Containerfile")).unwrap();
    let instructions = containerfile_instructions(&text);

    common::phase("the Containerfile's promises, as text");
    let (binaries, rust_version) = workspace_binaries_and_rust_version();
    let base_images: Vec<&str> = instruction_arguments(&instructions, "FROM")
        .into_iter()
        .filter_map(|a| a.split_whitespace().find(|w| !w.starts_with("--")))
        .collect();
    assert_eq!(base_images.len(), 2, "two stages, build and run: {base_images:?}");
    assert!(
        base_images[0].starts_with(&format!("rust:{rust_version}-")),
        "the build stage uses the workspace's rust-version {rust_version}: {}",
        base_images[0]
    );
    let user = *instruction_arguments(&instructions, "USER")
        .last()
        .expect("a USER instruction");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "the image runs as a numeric non-root user (Kubernetes' runAsNonRoot checks a number): USER {user}"
    );
    let healthcheck = instruction_arguments(&instructions, "HEALTHCHECK");
    assert_eq!(healthcheck.len(), 1, "one HEALTHCHECK");
    assert!(
        healthcheck[0].contains("$FERROCOTTA_HEALTH_URL")
            && instruction_arguments(&instructions, "ENV")
                .iter()
                .any(|e| e.starts_with("FERROCOTTA_HEALTH_URL=")),
        "the HEALTHCHECK asks the URL in FERROCOTTA_HEALTH_URL, which has a default: {}",
        healthcheck[0]
    );
    let mut copied = Vec::new();
    for copy in instruction_arguments(&instructions, "COPY") {
        let words: Vec<&str> = copy.split_whitespace().collect();
        if !words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        let paths: Vec<&str> = words.iter().copied().filter(|w| !w.starts_with("--")).collect();
        for &source in &paths[..paths.len().saturating_sub(1)] {
            let binary = source.rsplit('/').next().unwrap_or(source);
            assert!(
                binaries.iter().any(|b| b == binary),
                "the Containerfile copies `{binary}`, which is no binary of the workspace ({binaries:?})"
            );
            copied.push(binary.to_string());
        }
    }
    for program in ["cache-array", "integration-node", "ferrocotta"] {
        assert!(
            copied.iter().any(|c| c == program),
            "the image holds {program}: {copied:?}"
        );
    }

    common::phase("building the image, where a container tool and the base images are here");
    let tool = match container_tool() {
        Ok(tool) => tool,
        Err(why) => {
            eprintln!(
                "SKIPPED: no container tool runs here ({why}); the Containerfile was checked as text but NOT built"
            );
            return;
        }
    };
    let missing: Vec<&str> = base_images
        .iter()
        .copied()
        .filter(|&image| {
            !Command::new(tool)
                .args(["image", "inspect", image])
                .output()
                .is_ok_and(|out| out.status.success())
        })
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED: {tool} runs, but the base images {missing:?} are not here (`{tool} pull` them); the Containerfile was checked as text but NOT built"
        );
        return;
    }
    let tag = format!("localhost/ferrocotta-test:{}", std::process::id());
    let _remove = RemoveImage { tool, tag: tag.clone() };
    let out = Command::new(tool)
        .args(["build", "-f", "Containerfile", "-t", tag.as_str(), "."])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool} build failed:\n{}\n{}",
        tail(&out.stdout, 20),
        tail(&out.stderr, 60)
    );

    common::phase("the image's programs run, as user 10001");
    for program in ["cache-array", "integration-node", "ferrocotta"] {
        let out = Command::new(tool)
            .args(["run", "--rm", tag.as_str(), program, "--version"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} --version in the image: exit {:?}: {}",
            out.status.code(),
            tail(&out.stderr, 20)
        );
    }
    let out = Command::new(tool)
        .args(["run", "--rm", tag.as_str(), "id", "-u"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10001", "the image's user");
}
