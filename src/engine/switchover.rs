//! The switchover: pause the VM, send the final round with every sender,
//! verify, move the device state, and resume the VM on the destination.

use super::phase::Phase;
use super::report::Downtime;
use super::{EngineError, Migration};
use crate::protocol::{Message, MessageKind, MAX_BULK};
use base64::Engine as _;
use std::time::{Duration, Instant};

/// What the default switchover deadline allows beyond the expected pause.
const DEFAULT_SWITCHOVER_SLACK: Duration = Duration::from_secs(5);

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Migration {
    /// Pauses the VM and moves it; `estimate` is the downtime the rounds
    /// predicted (the switchover deadline allows for it).
    pub(super) async fn switchover(&mut self, estimate: Duration) -> Result<(), EngineError> {
        self.check_cancel()?;
        let mut d = Downtime::default();
        let t_pause = Instant::now();
        self.set_phase("switchover: pause");
        // Journaled before the pause, not after: an agent killed between the
        // two must find "paused" on restart and resume the VM (resuming one
        // that never paused is harmless; leaving one paused is not).
        self.advance(Phase::Paused)?;
        self.blocking(|vm| vm.pause()).await?;
        d.pause_ms = ms(t_pause);
        // Everything the pause needs before `Resume` has a deadline: past it
        // the VM resumes on the source and every destination discards.
        let deadline = self.switchover_deadline(estimate);
        match tokio::time::timeout(deadline, self.before_resume(&mut d)).await {
            Ok(r) => r?,
            Err(_) => return Err(EngineError::SwitchoverTimeout(deadline)),
        }
        self.set_phase("switchover: resume on destination");
        // Nothing more is sent: the streams end here, before the destination
        // closes its side (which would look like a failure).
        self.links.values().for_each(|l| l.close_sender());
        let t = Instant::now();
        self.advance(Phase::ResumeSent)?;
        let target = self.target_link();
        let resume = Message::Resume { start: !self.job.opts.suspend, migration: Some(target.migration) };
        target.call(resume, MessageKind::Resumed).await.map_err(|e| self.lost(target.id, e))?;
        d.resume_ms = ms(t);
        self.report.downtime_ms = Some(ms(t_pause));
        self.report.downtime = d;
        self.report.vm_runs_on = Some(target.host.clone());
        if let Err(e) = self.blocking(|vm| vm.stop()).await {
            tracing::warn!("the VM runs on {} but stopping it here failed: {}", target.host, crate::error_chain(&e));
        }
        Ok(())
    }

    /// `--switchover-timeout`, or by default the larger of the downtime limit
    /// and the estimate, plus five seconds.
    fn switchover_deadline(&self, estimate: Duration) -> Duration {
        let limit = Duration::from_millis(self.job.opts.downtime_ms);
        match self.job.opts.switchover_timeout_ms {
            Some(ms) => Duration::from_millis(ms),
            None => limit.max(estimate.min(Duration::from_secs(3600))) + DEFAULT_SWITCHOVER_SLACK,
        }
    }

    /// The paused part before `Resume`: final sync and round, verification,
    /// device state.
    async fn before_resume(&mut self, d: &mut Downtime) -> Result<(), EngineError> {
        let t = Instant::now();
        self.dirty_sync().await?;
        d.final_sync_ms = ms(t);

        self.set_phase("switchover: final round");
        crate::hooks::gate(&self.job.ctx.me, "final-round").await;
        let t = Instant::now();
        self.drain().await?;
        d.final_send_ms = ms(t);
        // The destination has been fixed since the pause (`route`): past
        // here the source only commits to it.
        self.advance(Phase::Committing)?;
        self.check_cancel()?;

        if self.verifier.on() {
            self.set_phase("switchover: verify");
            crate::hooks::gate(&self.job.ctx.me, "verify").await;
            let t = Instant::now();
            self.verify_in_pause().await?;
            d.verify_ms = ms(t);
            self.report.verified = true;
        }
        self.check_cancel()?;

        self.set_phase("switchover: device state");
        crate::hooks::gate(&self.job.ctx.me, "device-state").await;
        let t = Instant::now();
        self.send_device_state().await?;
        d.device_state_ms = ms(t);
        self.check_cancel()
    }

    /// Reads the paused VM's device state and hands it to the target: in raw
    /// chunks (protocol 2), or in one base64 message to a version-1 peer.
    async fn send_device_state(&mut self) -> Result<(), EngineError> {
        let state = self.blocking(|vm| vm.device_state()).await?;
        self.report.device_state_bytes = state.len() as u64;
        let target = self.target_link();
        let lost = |e| self.lost(target.id, e);
        if !target.features.chunked_device_state() {
            let state = base64::engine::general_purpose::STANDARD.encode(&state);
            target.call(Message::DeviceState { state }, MessageKind::Ok).await.map_err(lost)?;
            return Ok(());
        }
        for piece in state.chunks(MAX_BULK as usize) {
            let m = Message::DeviceStateChunk { len: piece.len() as u32, bytes: piece.to_vec() };
            target.send(m).map_err(lost)?;
        }
        let end = Message::DeviceStateEnd { total: state.len() as u64 };
        target.call(end, MessageKind::Ok).await.map_err(lost)?;
        Ok(())
    }
}
