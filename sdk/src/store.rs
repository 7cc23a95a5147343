//! What a device must remember across restarts: request ids it already handed to the application (so a
//! command redelivered after a reconnect or resent by iothub's retry policy runs once), its tags and their
//! version, and its shadow version.
//!
//! One small JSON file per device, replaced atomically (write a temporary file in the same directory, then
//! rename) so a power cut leaves either the old or the new state, never half of one. Without a directory
//! the state lives in memory (simulations, tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Most remembered ids; the ones expiring first are forgotten first when a device receives more. The file is
/// rewritten on every new command, so this also bounds that write (~60 KiB).
pub const MAX_REMEMBERED: usize = 1_024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Dedup key → when it may be forgotten (Unix ms, corrected clock).
    #[serde(default)]
    pub seen: BTreeMap<String, i64>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub tags_version: i64,
    #[serde(default)]
    pub shadow_version: i64,
}

#[derive(Debug)]
pub struct StateStore {
    path: Option<PathBuf>,
    state: DeviceState,
}

impl StateStore {
    /// Memory only: nothing survives the process.
    pub fn in_memory() -> Self {
        Self { path: None, state: DeviceState::default() }
    }

    /// The state file of one device in `dir` (created if missing).
    pub fn open(dir: &Path, product: &str, device: &str) -> Result<Self> {
        let io = |source| Error::Store { path: dir.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Ids never contain '/' or '.', so this cannot escape `dir`.
        let path = dir.join(format!("{product}~{device}.json"));
        let state = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(state) => state,
                // Writes are atomic, so this is a damaged disk or a hand edit. A device that refused to start
                // over it would be bricked in the field: keep the file for diagnosis and start afresh (the
                // server resends tags and shadow; dedup restarts empty).
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    tracing::warn!(path = %path.display(), error = %e, aside = %aside.display(), "device state unreadable; starting afresh");
                    std::fs::rename(&path, &aside)
                        .map_err(|source| Error::Store { path: path.display().to_string(), source })?;
                    DeviceState::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DeviceState::default(),
            Err(source) => return Err(Error::Store { path: path.display().to_string(), source }),
        };
        Ok(Self { path: Some(path), state })
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// Records `key` until `forget_at` (ms) and says whether it was new. Expired entries are dropped first.
    /// `persist: false` keeps it in memory only (for what does not need to survive a restart).
    pub fn first_time(&mut self, key: &str, forget_at: i64, now: i64, persist: bool) -> Result<bool> {
        self.state.seen.retain(|_, until| *until > now);
        if self.state.seen.contains_key(key) {
            return Ok(false);
        }
        if self.state.seen.len() >= MAX_REMEMBERED {
            if let Some(oldest) = self.state.seen.iter().min_by_key(|(_, until)| **until).map(|(k, _)| k.clone()) {
                self.state.seen.remove(&oldest);
            }
        }
        self.state.seen.insert(key.to_string(), forget_at);
        if persist {
            self.save()?;
        }
        Ok(true)
    }

    pub fn set_tags(&mut self, tags: Vec<String>, version: i64) -> Result<()> {
        self.state.tags = tags;
        self.state.tags_version = version;
        self.save()
    }

    pub fn set_shadow_version(&mut self, version: i64) -> Result<()> {
        if self.state.shadow_version == version {
            return Ok(());
        }
        self.state.shadow_version = version;
        self.save()
    }

    fn save(&self) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let io = |source| Error::Store { path: path.display().to_string(), source };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        serde_json::to_writer(&mut file, &self.state)?;
        file.as_file().sync_all().map_err(io)?;
        file.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_survives_a_restart_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::open(dir.path(), "p", "d").unwrap();
        assert!(store.first_time("r1", 2_000, 1_000, true).unwrap());
        assert!(!store.first_time("r1", 2_000, 1_500, true).unwrap());
        store.set_tags(vec!["lab".into()], 3).unwrap();
        store.set_shadow_version(7).unwrap();
        drop(store);

        let mut reopened = StateStore::open(dir.path(), "p", "d").unwrap();
        assert!(!reopened.first_time("r1", 2_000, 1_900, true).unwrap(), "remembered across the restart");
        assert_eq!((reopened.state().tags.clone(), reopened.state().tags_version), (vec!["lab".to_string()], 3));
        assert_eq!(reopened.state().shadow_version, 7);
        assert!(reopened.first_time("r1", 9_000, 2_001, true).unwrap(), "forgotten after its time");
        // Another device in the same directory has its own state.
        let mut other = StateStore::open(dir.path(), "p", "d2").unwrap();
        assert!(other.first_time("r1", 9_000, 2_001, true).unwrap());
    }

    #[test]
    fn memory_is_bounded() {
        let mut store = StateStore::in_memory();
        for i in 0..MAX_REMEMBERED + 5 {
            assert!(store.first_time(&format!("r{i}"), 10_000 + i as i64, 0, false).unwrap());
        }
        assert_eq!(store.state().seen.len(), MAX_REMEMBERED);
        assert!(!store.state().seen.contains_key("r0"), "the entry expiring first went first");
    }

    #[test]
    fn a_corrupt_file_is_kept_aside_and_the_device_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p~d.json"), b"{not json").unwrap();
        let mut store = StateStore::open(dir.path(), "p", "d").unwrap();
        assert_eq!(store.state(), &DeviceState::default());
        assert_eq!(std::fs::read(dir.path().join("p~d.json.corrupt")).unwrap(), b"{not json");
        assert!(store.first_time("r1", 10, 0, true).unwrap());
        assert!(StateStore::open(dir.path(), "p", "d").unwrap().state().seen.contains_key("r1"));
    }
}
