//! The users incoming VMs run as on this host: the data dir opened to
//! them, and a uid of its own for each incoming QEMU, held while its
//! session lasts (a committed VM keeps it in its record).

use super::{Agent, AgentError};
use std::collections::HashSet;

impl Agent {
    /// Lets incoming QEMUs' users reach their RAM files in the data dir
    /// and on the huge-page mounts (search permission only).
    pub(super) fn open_data_dir(&self) -> Result<(), AgentError> {
        use crate::vm::qemu::user::{open_dir_to, Identity, RunAs};
        let id = match &self.cfg.qemu_run_as {
            RunAs::Agent => return Ok(()),
            RunAs::User(u) => u.identity(),
            RunAs::Uids(r) => Identity { uid: r.first, gid: r.first, groups: vec![] },
        };
        open_dir_to(&self.cfg.data_dir, &id)?;
        self.cfg.hugepages.iter().try_for_each(|m| open_dir_to(&m.dir, &id))?;
        Ok(())
    }

    /// A user for a new incoming QEMU (see [`crate::vm::qemu::RunAs`]):
    /// with a uid range, the lowest uid no VM of this agent and no process
    /// has; it is held until [`release_uid`](Self::release_uid).
    pub fn take_identity(&self) -> Result<Option<crate::vm::qemu::user::Identity>, String> {
        use crate::vm::qemu::RunAs;
        match &self.cfg.qemu_run_as {
            RunAs::Agent => Ok(None),
            RunAs::User(u) => Ok(Some(u.identity())),
            RunAs::Uids(r) => {
                let mut held = self.uids.lock().unwrap();
                let mut taken: HashSet<u32> = self.vms.lock().unwrap().values().filter_map(|v| v.uid).collect();
                taken.extend(held.iter().copied());
                let id = r.pick(&taken).ok_or_else(|| format!("every uid of {}-{} is in use", r.first, r.last))?;
                held.insert(id.uid);
                Ok(Some(id))
            }
        }
    }

    /// Gives a uid [`take_identity`](Self::take_identity) held back (the
    /// session ended; a committed VM keeps it in its record).
    pub fn release_uid(&self, uid: Option<u32>) {
        if let Some(u) = uid {
            self.uids.lock().unwrap().remove(&u);
        }
    }
}
