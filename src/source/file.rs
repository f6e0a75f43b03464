//! BalancedServices from a YAML file, for `balanced standalone`.
//!
//! The file is re-read when it changes or on SIGHUP. A bad new file is reported
//! and ignored: the last good configuration keeps serving (nginx `-s reload`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::config::{Config, TargetPort};
use crate::api::load::{LoadError, LoadErrors, parse_documents};
use crate::api::validate::FieldError;
use crate::api::validate::validate;

/// Reads, parses and validates a standalone file.
pub fn read_configs(path: &Path) -> Result<Vec<Config>, LoadErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadErrors(vec![LoadError::Read {
            file: path.display().to_string(),
            message: e.to_string(),
        }])
    })?;
    configs_from_text(&text)
}

/// Parses and validates standalone YAML: the API's rules plus standalone's own
/// (no cluster, so no `spec.service` and no named target ports).
pub fn configs_from_text(text: &str) -> Result<Vec<Config>, LoadErrors> {
    let docs = parse_documents(text)?;
    let mut configs = Vec::new();
    let mut errors = Vec::new();
    for doc in docs {
        let invalid = |path: String, message: String| LoadError::Invalid {
            index: doc.index,
            key: doc.key.clone(),
            error: FieldError { path, message },
        };
        if doc.spec.service.is_some() {
            errors.push(invalid(
                "spec.service".into(),
                "standalone has no cluster to read a Service's endpoints from; list them in spec.endpoints".into(),
            ));
        }
        for (i, b) in doc.spec.backends.iter().enumerate() {
            if b.service.is_some() {
                errors.push(invalid(
                    format!("spec.backends[{i}].service"),
                    "standalone has no cluster to read a Service's endpoints from; list them in endpoints".into(),
                ));
            }
        }
        match validate(doc.key.clone(), &doc.spec) {
            Ok(cfg) => {
                for (i, l) in cfg.listeners.iter().enumerate() {
                    if let Some(TargetPort::Name(name)) = &l.target_port {
                        errors.push(invalid(
                            format!("spec.listeners[{i}].targetPort"),
                            format!("the port name {name:?} needs a Service; standalone takes port numbers"),
                        ));
                    }
                }
                configs.push(cfg);
            }
            Err(errs) => errors.extend(errs.0.into_iter().map(|e| invalid(e.path, e.message))),
        }
    }
    if errors.is_empty() {
        Ok(configs)
    } else {
        Err(LoadErrors(errors))
    }
}

/// Sends the file's configs each time its content changes or SIGHUP arrives;
/// a bad file is logged and sent as its errors, so the receiver can say why
/// the previous configs stay.
pub fn watch(
    path: PathBuf,
    poll: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<mpsc::Receiver<Result<Vec<Config>, LoadErrors>>> {
    let mut hangup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut last_seen = std::fs::read(&path).ok();
        let unreadable = crate::throttle::LogThrottle::new(Duration::from_secs(10));
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hangup.recv() => true,
                _ = tick.tick() => false,
            };
            let now = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    // Unreadable is not invalid (out of descriptors, a
                    // half-done rename): the running configuration stays and
                    // nothing is called rejected.
                    if let Some(n) = unreadable.hit() {
                        tracing::warn!(file = %path.display(), error = %e, times = n, "cannot read the configuration file; keeping the running configuration");
                    }
                    continue;
                }
            };
            if !forced && last_seen.as_ref() == Some(&now) {
                continue;
            }
            let text = String::from_utf8_lossy(&now).into_owned();
            // Remember what we tried, so a bad file is reported once, not every poll.
            last_seen = Some(now);
            let trigger = if forced { "SIGHUP" } else { "file changed" };
            match configs_from_text(&text) {
                Ok(configs) => {
                    tracing::info!(file = %path.display(), trigger, services = configs.len(), "reloading configuration");
                    if tx.send(Ok(configs)).await.is_err() {
                        return;
                    }
                }
                Err(errors) => {
                    for e in &errors.0 {
                        tracing::error!(file = %path.display(), trigger, error = %e, "configuration rejected; keeping the last good one");
                    }
                    if tx.send(Err(errors)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_refuses_service_and_named_ports() {
        let text = "
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: web}
spec:
  service: web
  endpoints: [{address: 127.0.0.1, port: 8081}]
  listeners: [{name: http, port: 8080, targetPort: http}]
";
        let err = configs_from_text(text).unwrap_err();
        assert_eq!(
            err.lines(),
            vec![
                "document 1 (default/web): spec.service: standalone has no cluster to read a Service's endpoints from; list them in spec.endpoints",
                "document 1 (default/web): spec.listeners[0].targetPort: the port name \"http\" needs a Service; standalone takes port numbers",
            ]
        );
    }
}
