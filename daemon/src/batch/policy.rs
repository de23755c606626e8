//! Which lines of a job run next, as a pure function over plain data. lmsd knows the whole job
//! up front, so with several models and memory for fewer it runs the lines of warm models
//! first and swaps once per model, not once per line as the file's order would.

use std::collections::{HashMap, HashSet};

pub use crate::config::BatchOrder as Order;

/// A model's pending lines in a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub model: String,
    pub count: u64,
    /// Where its first pending line is in the file.
    pub first: u64,
}

/// What to claim for `room` free places: `(Some(model), n)` for n lines of that model, or
/// `(None, n)` for the next n lines whatever their model. `in_flight` counts the job's running
/// lines per model; `warm` holds the models loaded now. `auto` lines choose a loaded model
/// themselves, so they count as warm.
pub fn next(
    pending: &[Pending],
    warm: &HashSet<String>,
    in_flight: &HashMap<String, u64>,
    room: u64,
    order: Order,
) -> Vec<(Option<String>, u64)> {
    if room == 0 || pending.is_empty() {
        return Vec::new();
    }
    if order == Order::File {
        return vec![(None, room)];
    }
    let busy = |p: &&Pending| in_flight.get(&p.model).is_some_and(|n| *n > 0);
    let loaded = |p: &&Pending| p.model == "auto" || warm.contains(&p.model);
    let mut chosen: Vec<&Pending> = pending.iter().filter(busy).collect();
    chosen.extend(pending.iter().filter(|p| !busy(p) && loaded(p)));
    let nothing_running = in_flight.values().all(|n| *n == 0);
    if chosen.is_empty() && nothing_running {
        // A swap: to the model with the most lines left (the earliest among equals).
        let most = pending
            .iter()
            .max_by(|a, b| a.count.cmp(&b.count).then(b.first.cmp(&a.first)));
        chosen.extend(most);
    }
    let mut left = room;
    let mut claims = Vec::new();
    for p in chosen {
        if left == 0 {
            break;
        }
        let n = p.count.min(left);
        left -= n;
        claims.push((Some(p.model.clone()), n));
    }
    claims
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(list: &[(&str, u64, u64)]) -> Vec<Pending> {
        list.iter()
            .map(|(model, count, first)| Pending {
                model: (*model).into(),
                count: *count,
                first: *first,
            })
            .collect()
    }

    fn set(models: &[&str]) -> HashSet<String> {
        models.iter().map(|m| (*m).to_owned()).collect()
    }

    #[test]
    fn warm_models_go_first_and_a_cold_one_waits_for_the_running_lines() {
        let lines = pending(&[("a", 5, 1), ("b", 9, 2), ("c", 3, 3)]);
        // b is loaded: its lines run, and nothing cold starts beside them.
        let claims = next(&lines, &set(&["b"]), &HashMap::new(), 4, Order::Warm);
        assert_eq!(claims, [(Some("b".into()), 4)]);
        // a's lines run; c is cold and waits although there is room.
        let running = HashMap::from([("a".to_owned(), 2)]);
        let claims = next(&lines, &set(&[]), &running, 4, Order::Warm);
        assert_eq!(claims, [(Some("a".into()), 4)]);
        let nearly = pending(&[("a", 1, 1), ("c", 3, 3)]);
        assert_eq!(
            next(&nearly, &set(&[]), &running, 4, Order::Warm),
            [(Some("a".into()), 1)]
        );
    }

    #[test]
    fn with_nothing_running_or_warm_the_model_with_most_lines_is_loaded() {
        let lines = pending(&[("a", 5, 1), ("b", 9, 2), ("c", 9, 3)]);
        let claims = next(&lines, &set(&[]), &HashMap::new(), 4, Order::Warm);
        assert_eq!(
            claims,
            [(Some("b".into()), 4)],
            "most lines, earliest first"
        );
        let auto = pending(&[("auto", 2, 1), ("a", 5, 2)]);
        assert_eq!(
            next(&auto, &set(&[]), &HashMap::new(), 4, Order::Warm),
            [(Some("auto".into()), 2)],
            "auto lines take a loaded model themselves"
        );
    }

    #[test]
    fn file_order_takes_the_next_lines_whatever_their_model() {
        let lines = pending(&[("a", 5, 1), ("b", 9, 2)]);
        assert_eq!(
            next(&lines, &set(&["b"]), &HashMap::new(), 3, Order::File),
            [(None, 3)]
        );
        assert!(next(&[], &set(&[]), &HashMap::new(), 3, Order::Warm).is_empty());
    }
}
