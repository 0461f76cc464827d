//! Where a migration is, as one value that only moves forward (instead of
//! separate flags that could disagree).

/// A migration's phase, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Mapping RAM, starting the tracker, opening the first destination.
    Setup,
    /// Rounds of dirty pages while the VM runs.
    Precopy,
    /// The VM is paused; the final round is running (the destination is fixed from here on).
    Paused,
    /// The final round is over: verification, device state.
    Committing,
    /// `Resume` was sent: the VM may run on the destination now.
    ResumeSent,
}

impl Phase {
    /// Moves to `to` if that is forward; a backward move is a bug and is ignored.
    pub fn advance(&mut self, to: Phase) {
        debug_assert!(to >= *self, "phase moved backwards: {self:?} -> {to:?}");
        if to > *self {
            *self = to;
        }
    }

    /// The VM is paused on the source (or gone from it).
    pub fn paused(self) -> bool {
        self >= Phase::Paused
    }

    /// The destination can no longer change.
    pub fn committing(self) -> bool {
        self >= Phase::Committing
    }

    /// The destination may already run the VM.
    pub fn resume_sent(self) -> bool {
        self >= Phase::ResumeSent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_moves_forward() {
        let mut p = Phase::Setup;
        p.advance(Phase::Paused);
        assert!(p.paused() && !p.committing());
        p.advance(Phase::ResumeSent);
        assert!(p.resume_sent() && p.committing());
    }
}
