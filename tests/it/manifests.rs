//! The deployment manifests (deploy/k8s), checked without a cluster or
//! kubectl: every overlay is rendered as kustomize renders it (resources,
//! namespace, images, strategic-merge patches: the features our
//! kustomizations use; any other key is refused), every document is read
//! into the Kubernetes API types (k8s-openapi) and must serialize back to
//! itself (a misspelled or misplaced field is lost on the way, and fails),
//! and the references between documents and to the binaries are checked:
//! selectors and labels, Services and ports, ConfigMaps, Secrets and claims,
//! container arguments against each binary's flags, the run files in the
//! ConfigMaps against their parsers, and the shard and worker counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, PodTemplateSpec, Service};
use serde::Deserialize;
use serde_json::Value;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

/// Every YAML document of a file, as JSON values.
fn read_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Renders the kustomization in `dir`.
fn render(dir: &Path) -> Vec<Value> {
    let [k] = read_docs(&dir.join("kustomization.yaml")).try_into().expect("one kustomization document");
    let known = ["apiVersion", "kind", "resources", "namespace", "images", "patches"];
    for key in k.as_object().expect("a mapping").keys() {
        assert!(known.contains(&key.as_str()), "{}: `{key}` is not rendered by this check", dir.display());
    }
    let mut docs = Vec::new();
    for r in k["resources"].as_array().expect("resources") {
        let path = dir.join(r.as_str().expect("a path"));
        docs.extend(if path.is_dir() { render(&path) } else { read_docs(&path) });
    }
    if let Some(ns) = k.get("namespace") {
        docs.iter_mut().for_each(|d| d["metadata"]["namespace"] = ns.clone());
    }
    for image in k.get("images").and_then(Value::as_array).into_iter().flatten() {
        let name = image["name"].as_str().expect("images[].name");
        for d in &mut docs {
            for c in containers_mut(d) {
                let current = c["image"].as_str().expect("an image").to_string();
                let (repo, tag) = current.rsplit_once(':').unwrap_or((&current, "latest"));
                if repo == name {
                    let repo = image.get("newName").and_then(Value::as_str).unwrap_or(repo);
                    let tag = image.get("newTag").and_then(Value::as_str).unwrap_or(tag);
                    c["image"] = format!("{repo}:{tag}").into();
                }
            }
        }
    }
    for p in k.get("patches").and_then(Value::as_array).into_iter().flatten() {
        let path = dir.join(p["path"].as_str().expect("patches[].path (inline patches are not rendered)"));
        for patch in read_docs(&path) {
            let target = docs
                .iter_mut()
                .find(|d| d["kind"] == patch["kind"] && d["metadata"]["name"] == patch["metadata"]["name"])
                .unwrap_or_else(|| panic!("{}: patches nothing", path.display()));
            merge(target, &patch);
        }
    }
    docs
}

/// A strategic merge as kustomize does it for our patches: mappings merge,
/// lists of named items (containers, ports, volumes) merge by name, anything
/// else is replaced.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(tv) => merge(tv, v),
                    None => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(p)) if p.iter().all(|i| i.get("name").is_some()) => {
            for item in p {
                match t.iter_mut().find(|ti| ti.get("name") == item.get("name")) {
                    Some(ti) => merge(ti, item),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// The pod template of a workload.
fn template_mut(d: &mut Value) -> Option<&mut Value> {
    match d["kind"].as_str()? {
        "Deployment" | "StatefulSet" | "Job" => Some(&mut d["spec"]["template"]),
        _ => None,
    }
}

fn containers_mut(d: &mut Value) -> Vec<&mut Value> {
    match template_mut(d).and_then(|t| t["spec"]["containers"].as_array_mut()) {
        Some(cs) => cs.iter_mut().collect(),
        None => Vec::new(),
    }
}

/// A workload: kind/name, pod template, selector labels.
type Workload<'a> = (String, &'a PodTemplateSpec, Option<BTreeMap<String, String>>);

/// Breaks a copy of the rendered documents.
type Breaker = Box<dyn Fn(&mut Vec<Value>)>;

/// The rendered documents, typed.
#[derive(Default)]
struct Manifests {
    config_maps: Vec<ConfigMap>,
    services: Vec<Service>,
    stateful_sets: Vec<StatefulSet>,
    jobs: Vec<Job>,
    deployments: Vec<Deployment>,
    claims: Vec<PersistentVolumeClaim>,
}

/// Reads a document into its API type; it must serialize back to itself.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &Value,
    problems: &mut Vec<String>,
) -> Option<T> {
    let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
    match serde_json::from_value::<T>(doc.clone()) {
        Ok(t) => {
            let back = serde_json::to_value(&t).expect("serialize");
            if &back != doc {
                problems.push(format!(
                    "{what}: fields the API does not know, or of the wrong shape: {}",
                    diff(doc, &back)
                ));
            }
            Some(t)
        }
        Err(e) => {
            problems.push(format!("{what}: {e}"));
            None
        }
    }
}

/// The first path where `a` and `b` differ.
fn diff(a: &Value, b: &Value) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                if x.get(k) != y.get(k) {
                    let (xa, yb) = (x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null));
                    return format!(".{k}{}", diff(xa, yb));
                }
            }
            String::new()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            let i = x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0);
            format!("[{i}]{}", diff(&x[i], &y[i]))
        }
        _ => format!(" ({a} read back as {b})"),
    }
}

impl Manifests {
    fn read(docs: &[Value], problems: &mut Vec<String>) -> Manifests {
        let mut m = Manifests::default();
        for d in docs {
            match d["kind"].as_str().unwrap_or("") {
                "ConfigMap" => m.config_maps.extend(typed(d, problems)),
                "Service" => m.services.extend(typed(d, problems)),
                "StatefulSet" => m.stateful_sets.extend(typed(d, problems)),
                "Job" => m.jobs.extend(typed(d, problems)),
                "Deployment" => m.deployments.extend(typed(d, problems)),
                "PersistentVolumeClaim" => m.claims.extend(typed(d, problems)),
                kind => problems.push(format!("a document of kind `{kind}` this check does not know")),
            }
        }
        m
    }

    /// (kind/name, pod template, selector labels) of every workload.
    fn workloads(&self) -> Vec<Workload<'_>> {
        let name = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.name.clone().unwrap_or_default()
        };
        let mut out = Vec::new();
        for s in &self.stateful_sets {
            let spec = s.spec.as_ref().expect("spec");
            out.push((
                format!("StatefulSet/{}", name(&s.metadata)),
                &spec.template,
                spec.selector.match_labels.clone(),
            ));
        }
        for d in &self.deployments {
            let spec = d.spec.as_ref().expect("spec");
            out.push((
                format!("Deployment/{}", name(&d.metadata)),
                &spec.template,
                spec.selector.match_labels.clone(),
            ));
        }
        for j in &self.jobs {
            let spec = j.spec.as_ref().expect("spec");
            out.push((format!("Job/{}", name(&j.metadata)), &spec.template, None));
        }
        out
    }

    fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps.iter().find(|c| c.metadata.name.as_deref() == Some(name))
    }
}

/// The flags of the binary an image runs, as a clap command.
fn binary_command(image: &str) -> Option<clap::Command> {
    use clap::{Args, CommandFactory};
    let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
    Some(match repo.rsplit('/').next()? {
        "ps-server" => ps_server::cli::Args::augment_args(clap::Command::new("ps-server")),
        "ps-worker" => ps_worker::cli::Args::augment_args(clap::Command::new("ps-worker")),
        "ps-serve" => ps_serve::cli::Args::command(),
        _ => return None,
    })
}

/// Every problem of a rendered set of documents.
fn check(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let m = Manifests::read(docs, &mut problems);
    let labels_of =
        |t: &PodTemplateSpec| t.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    let subset = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
        a.iter().all(|(k, v)| b.get(k) == Some(v))
    };

    for (what, template, selector) in m.workloads() {
        let labels = labels_of(template);
        if let Some(sel) = &selector
            && (sel.is_empty() || !subset(sel, &labels))
        {
            problems.push(format!("{what}: selector {sel:?} does not match its pods' labels {labels:?}"));
        }
        let pod = template.spec.as_ref().expect("pod spec");
        let volumes: BTreeMap<&str, _> = pod.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
        let claim_templates: BTreeSet<String> = (m.stateful_sets.iter())
            .filter(|s| what == format!("StatefulSet/{}", s.metadata.name.clone().unwrap_or_default()))
            .flat_map(|s| s.spec.as_ref().and_then(|s| s.volume_claim_templates.clone()).unwrap_or_default())
            .filter_map(|c| c.metadata.name)
            .collect();
        for v in volumes.values() {
            if let Some(cm) = &v.config_map
                && m.config_map(&cm.name).is_none()
                && cm.optional != Some(true)
            {
                problems.push(format!(
                    "{what}: volume {} names ConfigMap {} that no manifest makes",
                    v.name, cm.name
                ));
            }
            if let Some(s) = &v.secret
                && s.optional != Some(true)
            {
                problems.push(format!(
                    "{what}: volume {} needs Secret {:?} (not in the manifests; make it optional)",
                    v.name, s.secret_name
                ));
            }
            if let Some(c) = &v.persistent_volume_claim
                && !m.claims.iter().any(|pvc| pvc.metadata.name.as_deref() == Some(c.claim_name.as_str()))
            {
                problems.push(format!(
                    "{what}: volume {} names claim {} that no manifest makes",
                    v.name, c.claim_name
                ));
            }
        }
        for c in &pod.containers {
            let ports: BTreeMap<String, i32> = (c.ports.iter().flatten())
                .filter_map(|p| Some((p.name.clone()?, p.container_port)))
                .collect();
            for mount in c.volume_mounts.iter().flatten() {
                if !volumes.contains_key(mount.name.as_str()) && !claim_templates.contains(&mount.name) {
                    problems
                        .push(format!("{what}: container {} mounts unknown volume {}", c.name, mount.name));
                }
            }
            for e in c.env.iter().flatten() {
                let source = e.value_from.as_ref();
                if let Some(r) = source.and_then(|s| s.secret_key_ref.as_ref())
                    && r.optional != Some(true)
                {
                    problems
                        .push(format!("{what}: env {} needs Secret {} (make it optional)", e.name, r.name));
                }
                if let Some(r) = source.and_then(|s| s.config_map_key_ref.as_ref())
                    && m.config_map(&r.name)
                        .and_then(|c| c.data.as_ref())
                        .is_none_or(|d| !d.contains_key(&r.key))
                {
                    problems.push(format!(
                        "{what}: env {} names key {} of ConfigMap {}, which does not exist",
                        e.name, r.key, r.name
                    ));
                }
            }
            for (probe, p) in [("readiness", &c.readiness_probe), ("liveness", &c.liveness_probe)] {
                let port = p.as_ref().and_then(|p| {
                    p.http_get
                        .as_ref()
                        .map(|h| h.port.clone())
                        .or(p.tcp_socket.as_ref().map(|t| t.port.clone()))
                });
                if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) = port
                    && !ports.contains_key(&name)
                {
                    problems.push(format!(
                        "{what}: {probe} probe names port {name}, which the container does not have"
                    ));
                }
            }
            // The arguments, as the binary parses them (flags fed by the
            // environment the manifest sets count as given).
            let image = c.image.clone().unwrap_or_default();
            let Some(mut cmd) = binary_command(&image) else {
                problems.push(format!("{what}: image {image} runs no binary of this project"));
                continue;
            };
            let set: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
            let mut argv: Vec<String> = vec![cmd.get_name().to_string()];
            argv.extend(c.args.iter().flatten().cloned());
            for a in cmd.get_arguments() {
                if let (Some(env), Some(long)) = (a.get_env(), a.get_long())
                    && set.contains(env.to_str().unwrap_or(""))
                    && !argv.iter().any(|x| x == &format!("--{long}"))
                {
                    argv.extend([format!("--{long}"), "0".into()]);
                }
            }
            cmd = cmd.no_binary_name(false);
            match cmd.try_get_matches_from(&argv) {
                Err(e) => problems.push(format!("{what}: `{}` is refused: {}", argv.join(" "), e.render())),
                Ok(matches) => {
                    if let Ok(Some(config)) = matches.try_get_one::<PathBuf>("config") {
                        check_config_file(&what, config, c, &volumes, &m, &mut problems);
                    }
                }
            }
        }
    }

    for s in &m.services {
        let name = s.metadata.name.clone().unwrap_or_default();
        let spec = s.spec.as_ref().expect("spec");
        let selector = spec.selector.clone().unwrap_or_default();
        let matched: Vec<_> = m
            .workloads()
            .into_iter()
            .filter(|(_, t, _)| !selector.is_empty() && subset(&selector, &labels_of(t)))
            .collect();
        if matched.is_empty() {
            problems.push(format!("Service {name}: selector {selector:?} selects no pods"));
        }
        for port in spec.ports.iter().flatten() {
            if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(target)) =
                &port.target_port
            {
                let has = matched.iter().any(|(_, t, _)| {
                    (t.spec.iter().flat_map(|p| &p.containers))
                        .any(|c| c.ports.iter().flatten().any(|p| p.name.as_deref() == Some(target)))
                });
                if !has {
                    problems.push(format!("Service {name}: target port {target} is no port of its pods"));
                }
            }
        }
    }
    for sts in &m.stateful_sets {
        let spec = sts.spec.as_ref().expect("spec");
        let headless = m.services.iter().any(|s| {
            s.metadata.name.as_deref() == spec.service_name.as_deref()
                && s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
        });
        if !headless {
            problems.push(format!(
                "StatefulSet {:?}: serviceName {:?} is no headless Service",
                sts.metadata.name, spec.service_name
            ));
        }
    }
    check_counts(&m, &mut problems);
    problems
}

/// `--config PATH` is a key of a ConfigMap mounted at PATH's folder, and the
/// file parses as the binary's config.
fn check_config_file(
    what: &str,
    path: &Path,
    c: &k8s_openapi::api::core::v1::Container,
    volumes: &BTreeMap<&str, &k8s_openapi::api::core::v1::Volume>,
    m: &Manifests,
    problems: &mut Vec<String>,
) {
    let dir = path.parent().and_then(Path::to_str).unwrap_or("");
    let key = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
    let mount = c.volume_mounts.iter().flatten().find(|v| v.mount_path == dir);
    let cm = mount.and_then(|v| volumes.get(v.name.as_str())).and_then(|v| v.config_map.as_ref());
    let Some(text) =
        cm.and_then(|cm| m.config_map(&cm.name)).and_then(|c| c.data.as_ref()).and_then(|d| d.get(key))
    else {
        problems
            .push(format!("{what}: --config {} is no key of a ConfigMap mounted at {dir}", path.display()));
        return;
    };
    let parsed = match key {
        "shard.toml" => toml::from_str::<ps_server::ServerConfig>(text)
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate().map_err(|e| e.to_string())),
        _ => ps_worker::config::RunConfig::from_toml(text).map(|_| ()).map_err(|e| e.to_string()),
    };
    if let Err(e) = parsed {
        problems.push(format!("{what}: {key} in its ConfigMap does not parse: {e}"));
    }
}

/// Shards: StatefulSet replicas = `num_shards` = the workers' `--servers`
/// (each `<set>-<i>.<service>:<grpc port>`, in order); workers: the Job's
/// completions = parallelism = `--workers` = the run file's workers.
fn check_counts(m: &Manifests, problems: &mut Vec<String>) {
    let (Some(sts), Some(job)) = (m.stateful_sets.first(), m.jobs.first()) else {
        problems.push("no shard StatefulSet or no worker Job".into());
        return;
    };
    let spec = sts.spec.as_ref().expect("spec");
    let replicas = spec.replicas.unwrap_or(1);
    let shard_cfg: Option<ps_server::ServerConfig> = m
        .config_map("ps-shard-config")
        .and_then(|c| c.data.as_ref()?.get("shard.toml").and_then(|t| toml::from_str(t).ok()));
    if shard_cfg.as_ref().map(|c| c.num_shards as i32) != Some(replicas) {
        problems.push(format!("the shards' num_shards differs from the StatefulSet's {replicas} replicas"));
    }
    let set = sts.metadata.name.clone().unwrap_or_default();
    let svc = spec.service_name.clone().unwrap_or_default();
    let expected: Vec<String> = (0..replicas).map(|i| format!("{set}-{i}.{svc}:7000")).collect();
    let jspec = job.spec.as_ref().expect("spec");
    let pod = jspec.template.spec.as_ref().expect("pod spec");
    let args: Vec<String> = pod.containers[0].args.clone().unwrap_or_default();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let servers: Vec<String> = value("--servers").unwrap_or_default().split(',').map(String::from).collect();
    if servers != expected {
        problems.push(format!("the workers' --servers {servers:?} are not the shards {expected:?}"));
    }
    if jspec.completion_mode.as_deref() != Some("Indexed") {
        problems.push("the worker Job is not Indexed".into());
    }
    let workers: Option<i32> = value("--workers").and_then(|w| w.parse().ok());
    let run = (m.config_map("ps-run").and_then(|c| c.data.as_ref()?.get("run.toml")))
        .and_then(|t| ps_worker::config::RunConfig::from_toml(t).ok());
    let run_workers = run.map(|r| r.cluster.workers as i32);
    if workers.is_none()
        || workers != jspec.completions
        || workers != jspec.parallelism
        || workers != run_workers
    {
        problems.push(format!(
            "worker counts differ: --workers {workers:?}, completions {:?}, parallelism {:?}, run file {run_workers:?}",
            jspec.completions, jspec.parallelism
        ));
    }
}

fn overlays() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(k8s_dir().join("overlays"))
        .expect("deploy/k8s/overlays")
        .map(|e| e.expect("entry").path())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn the_base_and_every_overlay_render_and_check() {
    let mut dirs = vec![k8s_dir().join("base")];
    dirs.extend(overlays());
    assert!(dirs.len() >= 3, "base and two overlays: {dirs:?}");
    for dir in dirs {
        let docs = render(&dir);
        assert_eq!(docs.len(), 8, "{}: {} documents", dir.display(), docs.len());
        let problems = check(&docs);
        assert!(problems.is_empty(), "{}:\n{}", dir.display(), problems.join("\n"));
    }
}

#[test]
fn overlays_change_what_they_say() {
    let find = |docs: &[Value], kind: &str, name: &str| -> Value {
        docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).cloned().expect("present")
    };
    let prod = render(&k8s_dir().join("overlays/production"));
    let serve = find(&prod, "Deployment", "ps-serve");
    assert_eq!(serve["spec"]["replicas"], 3);
    assert_eq!(serve["metadata"]["namespace"], "paramserver");
    let c = &serve["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example.com/paramserver/ps-serve:0.1.0");
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(c["resources"]["requests"]["cpu"], "500m", "the patch merges into the base's resources");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "and keeps the rest of the container");
    let dev = render(&k8s_dir().join("overlays/dev"));
    let shard = find(&dev, "StatefulSet", "ps-shard");
    assert_eq!(shard["spec"]["template"]["spec"]["containers"][0]["image"], "paramserver/ps-server:dev");
    assert_eq!(find(&dev, "Deployment", "ps-serve")["spec"]["replicas"], 1);
}

/// The check finds what it is for: each broken copy of the base yields a
/// problem naming it.
#[test]
fn broken_manifests_are_caught() {
    let base = render(&k8s_dir().join("base"));
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "selector {",
            Box::new(|d| {
                set(d, "Service", "ps-serve", "/spec/selector/app.kubernetes.io~1name", "nobody".into())
            }),
        ),
        (
            "ConfigMap ps-run-x",
            Box::new(|d| {
                set(d, "Job", "ps-worker", "/spec/template/spec/volumes/0/configMap/name", "ps-run-x".into())
            }),
        ),
        (
            "is refused",
            Box::new(|d| {
                set(
                    d,
                    "StatefulSet",
                    "ps-shard",
                    "/spec/template/spec/containers/0/args/0",
                    "--konfig".into(),
                )
            }),
        ),
        ("--servers", Box::new(|d| set(d, "StatefulSet", "ps-shard", "/spec/replicas", 3.into()))),
        (
            "does not parse",
            Box::new(|d| set(d, "ConfigMap", "ps-run", "/data/run.toml", "[job]\nepochz = 1\n".into())),
        ),
        (
            "fields the API does not know",
            Box::new(|d| set(d, "Deployment", "ps-serve", "/spec/replica", 2.into())),
        ),
        (
            "readiness probe names port",
            Box::new(|d| {
                set(
                    d,
                    "Deployment",
                    "ps-serve",
                    "/spec/template/spec/containers/0/readinessProbe/httpGet/port",
                    "web".into(),
                )
            }),
        ),
        (
            "needs Secret",
            Box::new(|d| {
                set(
                    d,
                    "StatefulSet",
                    "ps-shard",
                    "/spec/template/spec/volumes/1/secret/optional",
                    false.into(),
                )
            }),
        ),
        ("worker counts differ", Box::new(|d| set(d, "Job", "ps-worker", "/spec/completions", 3.into()))),
    ];
    for (expect, break_it) in cases {
        let mut docs = base.clone();
        break_it(&mut docs);
        let problems = check(&docs);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "expected a problem with `{expect}`, got {problems:#?}"
        );
    }
}

/// Sets the value at JSON pointer `path` (creating the last key) in the
/// document `kind`/`name`.
fn set(docs: &mut [Value], kind: &str, name: &str, path: &str, value: Value) {
    let doc = docs.iter_mut().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).expect("document");
    let (parent, key) = path.rsplit_once('/').expect("a pointer");
    let key = key.replace("~1", "/");
    match doc.pointer_mut(parent).unwrap_or_else(|| panic!("{parent} in {kind}/{name}")) {
        Value::Object(o) => {
            o.insert(key, value);
        }
        Value::Array(a) => a[key.parse::<usize>().expect("an index")] = value,
        other => panic!("{path}: {other}"),
    }
}
