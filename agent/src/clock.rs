//! Kernel monotonic time → wall-clock time, computed once at start: per-event conversion is one
//! addition. (A wall-clock step after start, e.g. NTP slewing, is not followed; a restart is.)

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC at calibration, in ns.
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    /// Reads both clocks, taking the pair with the smallest gap of a few tries.
    pub fn calibrate() -> Self {
        let mut best: Option<(i128, i128)> = None;
        for _ in 0..5 {
            let m1 = now_ns(libc::CLOCK_MONOTONIC);
            let real = now_ns(libc::CLOCK_REALTIME);
            let m2 = now_ns(libc::CLOCK_MONOTONIC);
            let gap = m2 - m1;
            let offset = real - (m1 + gap / 2);
            if best.is_none_or(|(g, _)| gap < g) {
                best = Some((gap, offset));
            }
        }
        Clock {
            offset_ns: best.map(|(_, o)| o).unwrap_or(0),
        }
    }

    /// A clock with a fixed offset, for tests.
    pub fn with_offset(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    pub fn to_unix_nanos(&self, monotonic_ns: u64) -> u64 {
        (monotonic_ns as i128 + self.offset_ns).max(0) as u64
    }

    /// Current kernel monotonic time, as bpf_ktime_get_ns() reports it.
    pub fn monotonic_now() -> u64 {
        now_ns(libc::CLOCK_MONOTONIC) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_clock_maps_monotonic_now_to_wall_now() {
        let clock = Clock::calibrate();
        let wall = clock.to_unix_nanos(Clock::monotonic_now()) as i128;
        let real = now_ns(libc::CLOCK_REALTIME);
        assert!(
            (wall - real).abs() < 50_000_000,
            "off by {} ns",
            wall - real
        );
    }
}
