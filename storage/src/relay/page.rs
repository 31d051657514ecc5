//! Paging shared by the backends: how many entries (or mailbox items) one
//! answer takes.

/// Fills one answer: at most `limit` items, and no item that would take
/// the bytes over `bytes_target`, except the first.
pub(super) struct Pager {
    limit: usize,
    bytes_target: usize,
    count: usize,
    bytes: usize,
}

impl Pager {
    /// `limit` and `bytes_target` already capped by the caller.
    pub(super) fn new(limit: usize, bytes_target: usize) -> Self {
        Self {
            limit,
            bytes_target,
            count: 0,
            bytes: 0,
        }
    }

    /// Whether an item of `bytes` joins this answer; if so, it is counted.
    /// Once this says no, the answer is complete: the caller stops and
    /// reports that more remain.
    pub(super) fn admit(&mut self, bytes: usize) -> bool {
        let fits = self.count == 0 || self.bytes.saturating_add(bytes) <= self.bytes_target;
        if self.count >= self.limit || !fits {
            return false;
        }
        self.count += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_by_count_and_bytes_but_always_takes_one() {
        let mut pager = Pager::new(3, 10);
        assert!(pager.admit(4));
        assert!(pager.admit(6));
        assert!(!pager.admit(1), "10 bytes reached");

        let mut pager = Pager::new(3, 10);
        assert!(pager.admit(100), "the first item always comes");
        assert!(!pager.admit(0));

        let mut pager = Pager::new(2, 100);
        assert!(pager.admit(1) && pager.admit(1));
        assert!(!pager.admit(1), "limit reached");

        assert!(!Pager::new(0, 100).admit(1), "limit 0 takes nothing");
    }
}
