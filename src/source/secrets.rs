//! The Secrets a spec names (listener certificates, client certificates, CA
//! bundles), watched one by one by name, so a Role's `resourceNames` can
//! grant exactly them, and written as files under a private directory, where
//! the watchers that serve standalone's certificate files pick them up: a
//! changed Secret is loaded for new connections, one that does not load is
//! refused with its reason and the last good one stays (the kubelet's Secret
//! volumes work the same way, a minute later).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::config::ServiceKey;

/// The keys written: a `kubernetes.io/tls` Secret's two and a CA bundle's.
const KEYS: [&str; 3] = ["tls.key", "tls.crt", "ca.crt"];

/// Secrets watched for the services that name them, written under one directory.
pub struct SecretFiles {
    client: Client,
    dir: PathBuf,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    owners: HashMap<ServiceKey, BTreeSet<String>>,
    watches: HashMap<(String, String), Watched>,
}

struct Watched {
    stop: CancellationToken,
    state: Arc<Mutex<SecretState>>,
}

/// What became of one Secret.
#[derive(Clone, Debug, Default)]
struct SecretState {
    /// Files were written from it at least once.
    written: bool,
    /// Why it is not (or no longer) what the files hold.
    error: Option<String>,
}

impl SecretFiles {
    /// Writes under `dir` (made private, 0700), watching through `client`.
    pub fn new(client: Client, dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            client,
            dir,
            inner: Mutex::default(),
            changed: watch::channel(0).0,
        })
    }

    /// `$BALANCED_SECRETS_DIR`, else `balanced-secrets` in the temporary directory.
    pub fn default_dir() -> PathBuf {
        std::env::var_os("BALANCED_SECRETS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("balanced-secrets"))
    }

    /// Where Secret `name` of `namespace` is written.
    pub fn dir_of(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join(namespace).join(name)
    }

    /// Watches the Secrets `owner` names now (in its namespace), and stops
    /// watching the ones no service names any more.
    pub fn want(&self, owner: &ServiceKey, names: BTreeSet<String>) {
        let mut inner = self.inner.lock().expect("secrets lock");
        if names.is_empty() {
            inner.owners.remove(owner);
        } else {
            inner.owners.insert(owner.clone(), names);
        }
        let wanted: BTreeSet<(String, String)> = inner
            .owners
            .iter()
            .flat_map(|(k, names)| names.iter().map(|n| (k.namespace.clone(), n.clone())))
            .collect();
        inner.watches.retain(|id, w| {
            let keep = wanted.contains(id);
            if !keep {
                w.stop.cancel();
            }
            keep
        });
        for id in wanted {
            if inner.watches.contains_key(&id) {
                continue;
            }
            let state = Arc::new(Mutex::new(SecretState::default()));
            let stop = CancellationToken::new();
            tokio::spawn(watch_one(
                self.client.clone(),
                id.clone(),
                self.dir_of(&id.0, &id.1),
                state.clone(),
                self.changed.clone(),
                stop.clone(),
            ));
            inner.watches.insert(id, Watched { stop, state });
        }
    }

    /// Ticks each time files are written or a Secret's error changes.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether every one of `names` has been written; else which are not and why.
    pub fn ready(&self, namespace: &str, names: &BTreeSet<String>) -> Result<(), String> {
        let inner = self.inner.lock().expect("secrets lock");
        let missing: Vec<String> = names
            .iter()
            .filter_map(|n| {
                let state = inner
                    .watches
                    .get(&(namespace.to_string(), n.clone()))
                    .map(|w| w.state.lock().expect("secret state lock").clone())
                    .unwrap_or_default();
                (!state.written).then(|| match state.error {
                    Some(e) => format!("{n}: {e}"),
                    None => format!("{n}: not read yet"),
                })
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("waiting for Secret {}", missing.join("; ")))
        }
    }

    /// Each watched Secret of `namespace` whose latest version is not what
    /// its files hold, with why, for `/status`.
    pub fn errors(&self, namespace: &str) -> Vec<(String, String)> {
        let inner = self.inner.lock().expect("secrets lock");
        let mut out: Vec<(String, String)> = inner
            .watches
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .filter_map(|((_, name), w)| {
                let error = w.state.lock().expect("secret state lock").error.clone()?;
                Some((name.clone(), error))
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for SecretFiles {
    fn drop(&mut self) {
        if let Ok(inner) = self.inner.get_mut() {
            for w in inner.watches.values() {
                w.stop.cancel();
            }
        }
    }
}

async fn watch_one(
    client: Client,
    (namespace, name): (String, String),
    dir: PathBuf,
    state: Arc<Mutex<SecretState>>,
    changed: watch::Sender<u64>,
    stop: CancellationToken,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut seen = false;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => match e { Some(e) => e, None => return },
        };
        let error = match event {
            Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                seen = true;
                match write(&dir, &secret) {
                    Ok(()) => {
                        tracing::info!(%namespace, secret = %name, "secret written for the proxy");
                        state.lock().expect("secret state lock").written = true;
                        None
                    }
                    Err(e) => Some(e),
                }
            }
            Ok(watcher::Event::Delete(_)) => {
                seen = false;
                Some("deleted; the files written last stay in use".to_string())
            }
            Ok(watcher::Event::Init) => {
                seen = false;
                continue;
            }
            Ok(watcher::Event::InitDone) => (!seen).then(|| "not found".to_string()),
            Err(e) => Some(format!("watch: {e}")),
        };
        if let Some(e) = &error {
            tracing::warn!(%namespace, secret = %name, error = %e, "secret not written");
        }
        state.lock().expect("secret state lock").error = error;
        changed.send_modify(|n| *n += 1);
    }
}

/// Writes the Secret's known keys under `dir`, each to a new file renamed
/// over the old one, the key before the certificate (a reader between the
/// two sees a mismatch it refuses, never half a file).
fn write(dir: &Path, secret: &Secret) -> Result<(), String> {
    let data = secret.data.as_ref();
    let present: Vec<(&str, &[u8])> = KEYS
        .iter()
        .filter_map(|k| Some((*k, data?.get(*k)?.0.as_slice())))
        .collect();
    if present.is_empty() {
        return Err(format!("has none of {}", KEYS.join(", ")));
    }
    create_private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (key, bytes) in present {
        let tmp = dir.join(format!(".{key}.new"));
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        file.open(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| std::fs::rename(&tmp, dir.join(key)))
            .map_err(|e| format!("{}: {e}", dir.join(key).display()))?;
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}
