//! `--pid-file PATH`: where scripts, systemd's `PIDFile=` and
//! `kill -USR2 $(cat PATH)` find the server (the supervisor, with
//! `--processes`).
//!
//! The file is written whole under a temporary name and renamed into
//! place, so a reader never sees half a number; a restarted supervisor
//! rewrites it once it is ready. At the end it is removed only if it still
//! names this process (after a restart it names the new one).

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    armed: bool,
}

impl PidFile {
    /// Writes this process's pid to `path`.
    pub fn write(path: &Path) -> anyhow::Result<PidFile> {
        let pid = std::process::id();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{pid}.tmp"));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, format!("{pid}\n"))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                anyhow::anyhow!("--pid-file {}: cannot write it: {e}", path.display())
            })?;
        Ok(PidFile {
            path: path.to_path_buf(),
            armed: true,
        })
    }

    /// Leaves the file in place at the end (it is someone else's now).
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|s| s.trim() == std::process::id().to_string());
        if self.armed && ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
