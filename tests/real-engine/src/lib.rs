//! A real inference engine for lmsd's tests and benchmarks: llama.cpp's `llama-server` in router
//! mode, serving real models (Gemma 3 270M, tiny random GGUF models), as `setup.sh` beside this
//! crate builds and fetches them into a cache outside the checkout.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The smallest tiny random model (about 2 MB, 20 MB resident).
pub const TINY_A: &str = "tiny-a";
/// About 11 MB, 30 MB resident.
pub const TINY_B: &str = "tiny-b";
/// About 37 MB, 60 MB resident.
pub const TINY_C: &str = "tiny-c";
/// Gemma 3 270M, Q4_K_M: a real model that writes English.
pub const GEMMA: &str = "gemma-3-270m-q4_k_m";

/// How long the router may take to answer after it starts.
const START_LIMIT: Duration = Duration::from_secs(15);

/// Where `setup.sh` put the engine and the models.
#[derive(Debug, Clone)]
pub struct EngineFiles {
    pub server: PathBuf,
    pub models: PathBuf,
}

impl EngineFiles {
    /// `$LMSD_REAL_ENGINE_DIR`, else `$XDG_CACHE_HOME/lmsd/real-engine`, else
    /// `~/.cache/lmsd/real-engine`; an error says how to get the engine.
    pub fn locate() -> Result<EngineFiles, String> {
        let dir = std::env::var_os("LMSD_REAL_ENGINE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))
                    })?;
                Some(cache.join("lmsd/real-engine"))
            })
            .ok_or("neither LMSD_REAL_ENGINE_DIR nor HOME is set")?;
        let files = EngineFiles {
            server: dir.join("llama-server/llama-server"),
            models: dir.join("models"),
        };
        if files.server.exists() && files.models.join(format!("{TINY_A}.gguf")).exists() {
            Ok(files)
        } else {
            Err(format!(
                "the real engine (llama-server and its models) is not in {}: run tests/real-engine/setup.sh",
                dir.display()
            ))
        }
    }

    pub fn model_file(&self, model: &str) -> PathBuf {
        self.models.join(format!("{model}.gguf"))
    }
}

/// A router-mode `llama-server` serving some of the models, in its own process group so that
/// it and its per-model children die together. Killed when dropped.
#[derive(Debug)]
pub struct Router {
    /// `None` once killed.
    child: Option<Child>,
    files: EngineFiles,
    dir: TempDir,
    port: u16,
    /// What it serves, sorted.
    models: Vec<String>,
}

/// What a killed router leaves to restart it with: the same models on the same port.
#[derive(Debug)]
pub struct Stopped {
    files: EngineFiles,
    dir: TempDir,
    port: u16,
    models: Vec<String>,
}

impl Router {
    /// Starts a router on a free loopback port serving `models` (and no others), with lmsd's
    /// recommended flags: no autoload, a high `--models-max`; small contexts.
    pub async fn start(files: &EngineFiles, models: &[&str]) -> Result<Router, String> {
        Self::start_with(files, models, "").await
    }

    /// As `start`, with `extra_presets` (sections of the router's preset file) added.
    pub async fn start_with(
        files: &EngineFiles,
        models: &[&str],
        extra_presets: &str,
    ) -> Result<Router, String> {
        // A port picked free may be taken before the router binds it: then try another.
        let mut why = String::new();
        for _ in 0..3 {
            match Self::try_start(files, models, extra_presets).await {
                Ok(router) => return Ok(router),
                Err(error) => why = error,
            }
        }
        Err(why)
    }

    async fn try_start(
        files: &EngineFiles,
        models: &[&str],
        extra_presets: &str,
    ) -> Result<Router, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let models_dir = dir.path().join("models");
        std::fs::create_dir(&models_dir).map_err(|e| e.to_string())?;
        for model in models {
            let file = format!("{model}.gguf");
            std::os::unix::fs::symlink(files.models.join(&file), models_dir.join(&file))
                .map_err(|e| format!("cannot link {file}: {e}"))?;
        }
        // One thread for the tiny models leaves a core to lmsd and the tests on a 2-core
        // machine. Gemma 3 270M gets two, and a chat template: it is a base model without one.
        // (A preset section alone makes the router list a model: written only when served.)
        let mut presets = String::from("version = 1\n\n[*]\nc = 512\nt = 1\n");
        if models.contains(&GEMMA) {
            presets.push_str(&format!("\n[{GEMMA}]\nchat-template = gemma\nt = 2\n"));
        }
        presets.push_str(extra_presets);
        std::fs::write(dir.path().join("presets.ini"), presets).map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let mut models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
        models.sort();
        Stopped {
            files: files.clone(),
            dir,
            port,
            models,
        }
        .restart()
        .await
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn files(&self) -> &EngineFiles {
        &self.files
    }

    /// `GET /models`, if the router answers.
    pub async fn listing(&self) -> Option<Value> {
        let reply = reqwest::get(format!("{}/models", self.url())).await.ok()?;
        reply.json().await.ok()
    }

    /// The ids of the models the router has loaded, sorted. Panics if it does not answer: a
    /// dead router has nothing loaded, but a test must not take that for an unload.
    pub async fn loaded(&self) -> Vec<String> {
        let listing = self
            .listing()
            .await
            .expect("the router answers GET /models");
        model_ids(&listing, Some("loaded"))
    }

    /// Everything the router and its children printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("router.log")).unwrap_or_default()
    }

    /// How many times the router started a child for `model`.
    pub fn spawns_of(&self, model: &str) -> usize {
        self.log()
            .matches(&format!("spawning server instance with name={model} "))
            .count()
    }

    /// Pids of the processes running `model`'s file from this router's models directory: its
    /// children.
    pub fn children_of(&self, model: &str) -> Vec<u32> {
        let file = self.dir.path().join("models").join(format!("{model}.gguf"));
        processes_naming(&file)
    }

    /// SIGKILL to the router and its children.
    pub fn kill(mut self) -> Stopped {
        self.kill_group();
        let dir = std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().expect("a temp dir for the killed router"),
        );
        Stopped {
            files: self.files.clone(),
            dir,
            port: self.port,
            models: std::mem::take(&mut self.models),
        }
    }

    /// Kills the router's process group (it leads it) once, and reaps the router.
    fn kill_group(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        let killed = group.is_some_and(|group| {
            rustix::process::kill_process_group(group, rustix::process::Signal::KILL).is_ok()
        });
        if !killed {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.kill_group();
    }
}

impl Stopped {
    /// Starts the router again, same models, same port; returns once it answers.
    pub async fn restart(self) -> Result<Router, String> {
        use std::os::unix::process::CommandExt;
        let Stopped {
            files,
            dir,
            port,
            models,
        } = self;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("router.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new(&files.server)
            .arg("--models-dir")
            .arg(dir.path().join("models"))
            .arg("--models-preset")
            .arg(dir.path().join("presets.ini"))
            .args(["--models-max", "16", "--no-models-autoload"])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", files.server.display()))?;
        let mut router = Router {
            child: Some(child),
            files,
            dir,
            port,
            models,
        };
        let started = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = router.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "llama-server exited at start ({status}):\n{}",
                    router.log()
                ));
            }
            if let Some(listing) = router.listing().await {
                // Something else may answer on a port that was free a moment ago.
                let listed = model_ids(&listing, None);
                return if listed == router.models {
                    Ok(router)
                } else {
                    Err(format!(
                        "a server on port {port} lists {listed:?}, not this router's {:?}",
                        router.models
                    ))
                };
            }
            if started.elapsed() > START_LIMIT {
                return Err(format!(
                    "llama-server did not answer within {START_LIMIT:?}:\n{}",
                    router.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The ids in a `GET /models` listing whose status is `value` (all when `None`), sorted.
fn model_ids(listing: &Value, value: Option<&str>) -> Vec<String> {
    let mut ids: Vec<String> = listing["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| value.is_none_or(|v| m["status"]["value"] == v))
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// Pids whose command line names `path`.
fn processes_naming(path: &Path) -> Vec<u32> {
    let wanted = path.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|&b| b == 0)
                .any(|arg| arg == wanted)
                .then_some(pid)
        })
        .collect()
}
