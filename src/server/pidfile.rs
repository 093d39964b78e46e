//! `--pid-file PATH`: where scripts, systemd's `PIDFile=` and
//! `kill -USR2 $(cat PATH)` find the server (the supervisor, with
//! `--processes`).
//!
//! The file is written whole under a temporary name and renamed into
//! place, so a reader never sees half a number; a restarted supervisor
//! rewrites it once it is ready. At the end it is removed only if it still
//! names this process (after a restart it names the new one).
//!
//! Root may run this in a directory others can write (/tmp, /run/user):
//! the temporary file is created with O_CREAT|O_EXCL|O_NOFOLLOW under a
//! name nobody can guess, so it never opens a link or a file another user
//! planted, and rename(2) replaces whatever sits at PATH (a planted link
//! included) without following it. Its mode is set on the open file,
//! 0644, whatever the umask.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    armed: bool,
}

/// The pid file's mode: anyone may read it, only its owner write it.
const MODE: u32 = 0o644;

/// 64 bits from the kernel's random source, for a name nobody can guess.
fn unguessable() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom(2) writes at most `len` bytes into a valid buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never seen on Linux 3.17+; the pid and the clock are a fallback
        // that O_EXCL keeps safe (a planted name makes the open fail).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_ne_bytes(bytes)
}

/// Writes `contents` to `path` whole: into a new file no one else can have
/// made or linked, then renamed into place.
pub fn write_safely(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{:016x}.tmp", unguessable()));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true) // O_CREAT | O_EXCL
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(MODE)
            .open(&tmp)?;
        // The umask narrowed the mode at creation: set it on the file.
        f.set_permissions(std::fs::Permissions::from_mode(MODE))?;
        f.write_all(contents)?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

impl PidFile {
    /// Writes this process's pid to `path`.
    pub fn write(path: &Path) -> anyhow::Result<PidFile> {
        let pid = std::process::id();
        write_safely(path, format!("{pid}\n").as_bytes())
            .map_err(|e| anyhow::anyhow!("--pid-file {}: cannot write it: {e}", path.display()))?;
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
        // Read without following a link: a link at PATH is not ours.
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.is_file())
            && std::fs::read_to_string(&self.path)
                .is_ok_and(|s| s.trim() == std::process::id().to_string());
        if self.armed && ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
