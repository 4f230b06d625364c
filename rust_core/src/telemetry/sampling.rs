//! Whether a request's span is recorded: the caller's decision when its headers carry one,
//! else a random draw at the connection manager's percentage (Envoy's random_sampling).

/// `caller`: the sampled flag the request arrived with (None: the caller left it to us).
pub fn decide(caller: Option<bool>, random_sampling_percent: f64) -> bool {
    match caller {
        Some(decided) => decided,
        None => draw(random_sampling_percent, fastrand::f64()),
    }
}

/// `uniform` in [0, 1): sampled when it falls in the first `percent` of the range, so 0 % never
/// and 100 % always samples.
fn draw(percent: f64, uniform: f64) -> bool {
    uniform * 100.0 < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_decision_wins_over_the_percentage() {
        assert!(decide(Some(true), 0.0));
        assert!(!decide(Some(false), 100.0));
    }

    #[test]
    fn the_percentage_decides_when_the_caller_did_not() {
        assert!(!draw(0.0, 0.0));
        assert!(draw(100.0, 0.999_999));
        assert!(draw(1.0, 0.009));
        assert!(!draw(1.0, 0.011));
        let sampled = (0..20_000).filter(|_| decide(None, 10.0)).count();
        assert!((1_500..2_500).contains(&sampled), "{sampled} of 20000 at 10 %");
    }
}
