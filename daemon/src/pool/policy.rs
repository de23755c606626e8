//! Pool policy as pure functions over plain data, with time passed in: which instances have
//! outlived their idle TTL, which to evict to make room, and whether a load can fit at all.

use std::time::Duration;

use tokio::time::Instant;

use lmsd_proto::Ttl;

/// What policy needs to know about one resident instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Resident {
    pub id: String,
    pub model: String,
    /// Memory it holds, overhead included.
    pub bytes: u64,
    pub in_flight: u32,
    pub pinned: bool,
    /// Loaded by lmsd, or outside with `manage_external = true`: lmsd may unload it.
    pub managed: bool,
    /// Already on its way out (unloading, or draining for an explicit unload).
    pub leaving: bool,
    /// Its last task ended less than `turn_hold` ago: the agent's next call may want it, so it
    /// is not evicted yet (it may still expire by TTL).
    pub held: bool,
    pub ttl: Ttl,
    /// When its last task ended (or when it was loaded).
    pub last_used: Instant,
    /// How long its last load took: what evicting it costs if it is wanted again.
    pub load_time: Duration,
    /// Tasks it has served.
    pub uses: u64,
}

impl Resident {
    /// May lmsd unload it on its own, now?
    fn evictable(&self) -> bool {
        self.in_flight == 0 && !self.pinned && self.managed && !self.leaving
    }

    /// May it be evicted to make room now?
    fn evictable_for_room(&self) -> bool {
        self.evictable() && !self.held
    }

    /// May it become evictable once its running tasks end (or its hold runs out)?
    fn evictable_later(&self) -> bool {
        !self.pinned && self.managed && !self.leaving
    }

    /// Expected cost of evicting it: the reload time it would cost, weighted by how likely it
    /// is to be wanted again (often used, recently used). Lowest goes first.
    fn keep_value(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.last_used).as_secs_f64();
        let reload = self.load_time.as_secs_f64() + 1.0;
        reload * (self.uses as f64 + 1.0) / (idle + 1.0)
    }
}

/// Instances whose idle TTL has run out. Busy, pinned and unmanaged ones never expire.
pub fn expired(residents: &[Resident], now: Instant) -> Vec<String> {
    residents
        .iter()
        .filter(|r| r.evictable())
        .filter(|r| {
            r.ttl
                .left(now.saturating_duration_since(r.last_used))
                .is_some_and(|left| left.is_zero())
        })
        .map(|r| r.id.clone())
        .collect()
}

/// When the first of `residents` that may expire will (at `now` if one is due), or `None` when
/// none can: busy, pinned, unmanaged and `never` instances wait for an event, not the clock.
pub fn next_expiry(residents: &[Resident], now: Instant) -> Option<Instant> {
    residents
        .iter()
        .filter(|r| r.evictable())
        .filter_map(|r| r.ttl.left(now.saturating_duration_since(r.last_used)))
        .map(|left| now + left)
        .min()
}

/// Whether a load of `need` bytes can happen, given what is resident and reserved.
#[derive(Debug, Clone, PartialEq)]
pub enum Fit {
    /// Load now.
    Fits,
    /// Unload these first, then load.
    Evict(Vec<String>),
    /// Busy instances hold the memory; it will fit once they finish.
    WaitForBusy { busy: Vec<String> },
    /// Pinned or unmanaged instances (or the budget itself) leave no room, however long one waits.
    Never { holders: Vec<String> },
}

/// Which idle instances give way first when a load needs room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ranking {
    /// lmsd's: the cheapest to lose first — reload time × uses ÷ idle time.
    #[default]
    ReloadCost,
    /// The least recently used first: the usual cache policy, for the benchmark to compare.
    LeastRecentlyUsed,
}

/// Decides how a load of `need` bytes fits in `budget`, with `used` bytes resident or reserved.
pub fn plan_fit(residents: &[Resident], used: u64, budget: u64, need: u64, now: Instant) -> Fit {
    plan_fit_ranked(residents, used, budget, need, now, Ranking::ReloadCost)
}

/// As [`plan_fit`], with victims chosen in the order of `ranking`.
pub fn plan_fit_ranked(
    residents: &[Resident],
    used: u64,
    budget: u64,
    need: u64,
    now: Instant,
    ranking: Ranking,
) -> Fit {
    let free = budget.saturating_sub(used);
    if need <= free {
        return Fit::Fits;
    }
    let shortfall = need - free;
    if need > budget {
        return Fit::Never {
            holders: Vec::new(),
        };
    }
    let mut candidates: Vec<&Resident> = residents
        .iter()
        .filter(|r| r.evictable_for_room())
        .collect();
    match ranking {
        Ranking::ReloadCost => {
            candidates.sort_by(|a, b| a.keep_value(now).total_cmp(&b.keep_value(now)))
        }
        Ranking::LeastRecentlyUsed => candidates.sort_by_key(|r| r.last_used),
    }
    let mut victims: Vec<&Resident> = Vec::new();
    let mut freed = 0u64;
    for candidate in candidates {
        if freed >= shortfall {
            break;
        }
        freed += candidate.bytes;
        victims.push(candidate);
    }
    if freed >= shortfall {
        // Greedy order may overshoot: keep the most valuable victims that are not needed.
        for index in (0..victims.len()).rev() {
            if freed - victims[index].bytes >= shortfall {
                freed -= victims[index].bytes;
                victims.remove(index);
            }
        }
        return Fit::Evict(victims.into_iter().map(|v| v.id.clone()).collect());
    }
    let could_free: u64 = residents
        .iter()
        .filter(|r| r.evictable_later())
        .map(|r| r.bytes)
        .sum();
    if could_free >= shortfall {
        let busy = residents
            .iter()
            .filter(|r| r.evictable_later() && (r.in_flight > 0 || r.held))
            .map(|r| r.id.clone())
            .collect();
        return Fit::WaitForBusy { busy };
    }
    Fit::Never {
        holders: residents
            .iter()
            .filter(|r| !r.evictable_later())
            .map(|r| r.id.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    fn resident(id: &str, gb: u64, now: Instant) -> Resident {
        Resident {
            id: id.into(),
            model: id.into(),
            bytes: gb * GB,
            in_flight: 0,
            pinned: false,
            managed: true,
            leaving: false,
            held: false,
            ttl: Ttl::After(Duration::from_secs(60)),
            last_used: now,
            load_time: Duration::from_secs(gb),
            uses: 1,
        }
    }

    #[test]
    fn only_idle_managed_unpinned_instances_expire() {
        let start = Instant::now();
        let later = start + Duration::from_secs(61);
        let mut busy = resident("busy", 1, start);
        busy.in_flight = 1;
        let mut pinned = resident("pinned", 1, start);
        pinned.pinned = true;
        let mut outside = resident("outside", 1, start);
        outside.managed = false;
        let mut forever = resident("forever", 1, start);
        forever.ttl = Ttl::Never;
        let mut fresh = resident("fresh", 1, start);
        fresh.last_used = start + Duration::from_secs(30);
        let idle = resident("idle", 1, start);
        let all = [busy, pinned, outside, forever, fresh, idle];
        assert_eq!(expired(&all, later), vec!["idle".to_string()]);
        assert!(expired(&all, start).is_empty());
    }

    #[test]
    fn the_next_expiry_is_the_soonest_of_those_that_can_expire() {
        let start = Instant::now();
        let mut busy = resident("busy", 1, start);
        busy.in_flight = 1;
        busy.ttl = Ttl::After(Duration::from_secs(1));
        let mut forever = resident("forever", 1, start);
        forever.ttl = Ttl::Never;
        let mut soon = resident("soon", 1, start);
        soon.ttl = Ttl::After(Duration::from_secs(20));
        let later = resident("later", 1, start);
        assert_eq!(
            next_expiry(&[busy.clone(), forever.clone(), soon, later], start),
            Some(start + Duration::from_secs(20))
        );
        assert_eq!(next_expiry(&[busy, forever], start), None);
        let overdue = resident("overdue", 1, start);
        let now = start + Duration::from_secs(90);
        assert_eq!(next_expiry(&[overdue], now), Some(now));
    }

    #[test]
    fn a_zero_ttl_expires_as_soon_as_idle() {
        let now = Instant::now();
        let mut r = resident("r", 1, now);
        r.ttl = Ttl::After(Duration::ZERO);
        assert_eq!(expired(&[r], now), vec!["r".to_string()]);
    }

    #[test]
    fn fits_without_eviction_when_there_is_room() {
        let now = Instant::now();
        assert_eq!(
            plan_fit(&[resident("a", 2, now)], 2 * GB, 6 * GB, 3 * GB, now),
            Fit::Fits
        );
    }

    #[test]
    fn evicts_the_cheapest_to_lose_and_no_more_than_needed() {
        let now = Instant::now();
        // "stale" has been idle long and is cheap to reload; "hot" is used a lot.
        let mut stale = resident("stale", 2, now - Duration::from_secs(600));
        stale.last_used = now - Duration::from_secs(600);
        let mut hot = resident("hot", 2, now);
        hot.uses = 50;
        let big = resident("big", 4, now);
        let all = [hot, stale, big];
        // 8 GB used of 9: a 3 GB load needs 2 GB freed.
        assert_eq!(
            plan_fit(&all, 8 * GB, 9 * GB, 3 * GB, now),
            Fit::Evict(vec!["stale".into()])
        );
    }

    #[test]
    fn never_evicts_busy_or_pinned_and_says_who_holds_memory() {
        let now = Instant::now();
        let mut busy = resident("busy", 3, now);
        busy.in_flight = 2;
        let mut pinned = resident("pinned", 2, now);
        pinned.pinned = true;
        let all = [busy, pinned];
        // 5 of 6 GB used, need 3: only the busy one could give way, later.
        assert_eq!(
            plan_fit(&all, 5 * GB, 6 * GB, 3 * GB, now),
            Fit::WaitForBusy {
                busy: vec!["busy".into()]
            }
        );
        // Need 4.5: even the busy one is not enough; the pinned one holds the rest.
        assert_eq!(
            plan_fit(&all, 5 * GB, 6 * GB, 4 * GB + GB / 2, now),
            Fit::Never {
                holders: vec!["pinned".into()]
            }
        );
    }

    #[test]
    fn a_held_instance_waits_out_its_turn_but_still_expires() {
        let now = Instant::now();
        let mut held = resident("held", 3, now - Duration::from_secs(120));
        held.held = true;
        let all = [held];
        assert_eq!(
            plan_fit(&all, 3 * GB, 4 * GB, 2 * GB, now),
            Fit::WaitForBusy {
                busy: vec!["held".into()]
            }
        );
        assert_eq!(expired(&all, now), vec!["held".to_string()]);
    }

    #[test]
    fn a_model_larger_than_the_budget_never_fits() {
        let now = Instant::now();
        assert_eq!(
            plan_fit(&[], 0, 4 * GB, 5 * GB, now),
            Fit::Never { holders: vec![] }
        );
    }

    #[test]
    fn unmanaged_instances_are_never_victims() {
        let now = Instant::now();
        let mut outside = resident("outside", 3, now);
        outside.managed = false;
        let mine = resident("mine", 2, now);
        let all = [outside, mine];
        assert_eq!(
            plan_fit(&all, 5 * GB, 6 * GB, 3 * GB, now),
            Fit::Evict(vec!["mine".into()])
        );
        assert_eq!(
            plan_fit(&all, 5 * GB, 6 * GB, 4 * GB, now),
            Fit::Never {
                holders: vec!["outside".into()]
            }
        );
    }
}
