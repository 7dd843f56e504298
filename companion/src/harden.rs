//! The companion's own check of its privileges. `nhid` already dropped them before exec; this
//! makes the contract hold even if the binary is started another way: never root, no
//! capabilities in any set, `no_new_privs`, and not dumpable (so no process of the same uid can
//! ptrace it or read its memory through /proc).

use caps::CapSet;

pub fn harden() -> Result<(), String> {
    // SAFETY: getuid/geteuid have no preconditions and cannot fail.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    if uid == 0 || euid == 0 {
        return Err(
            "refusing to run as root: the companion runs as its own unprivileged uid".into(),
        );
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        caps::clear(None, set).map_err(|e| format!("clearing {set:?} capabilities: {e}"))?;
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ] {
        let held =
            caps::read(None, set).map_err(|e| format!("reading {set:?} capabilities: {e}"))?;
        if !held.is_empty() {
            return Err(format!(
                "still holds {set:?} capabilities {held:?}; start companions through nhid"
            ));
        }
    }
    // SAFETY: prctl with these constant arguments only changes flags of this process.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(format!("dumpable: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}
