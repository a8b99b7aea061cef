//! [`IdRing`]: a map from sequential ids, as a ring.

use std::collections::VecDeque;

/// Values keyed by ids handed out in increasing order and removed in
/// about that order: a ring from the oldest id present, where ids removed
/// out of order are empty slots until the older ones go, so its memory is
/// the span from the oldest id present to the newest.
pub struct IdRing<T> {
    /// Id of `slots[0]`; when not empty, `slots[0]` is occupied.
    base: u64,
    slots: VecDeque<Option<T>>,
    len: usize,
}

impl<T> IdRing<T> {
    /// Ids present.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The oldest id present.
    pub fn first_id(&self) -> Option<u64> {
        (self.len > 0).then_some(self.base)
    }

    /// Add `id`, which must be above every id present.
    pub fn insert(&mut self, id: u64, o: T) {
        if self.slots.is_empty() {
            self.base = id;
        }
        let i = (id - self.base) as usize;
        if i > self.slots.len() {
            self.slots.resize_with(i, || None);
        }
        self.slots.push_back(Some(o));
        self.len += 1;
    }

    /// Take `id`'s value out, if present.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        let o = if i == 0 {
            // The oldest (the usual case): moved out once, not taken and
            // then popped as an empty slot.
            let o = self.slots.pop_front()?;
            self.base += 1;
            o?
        } else {
            self.slots.get_mut(i)?.take()?
        };
        self.len -= 1;
        while self.slots.front().is_some_and(|s| s.is_none()) {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(o)
    }

    /// Present ids in `lo..=hi`, ascending.
    pub fn ids_in(&self, lo: u64, hi: u64) -> impl Iterator<Item = u64> + '_ {
        let from = lo.saturating_sub(self.base) as usize;
        let to = (hi.saturating_sub(self.base) as usize).min(self.slots.len().saturating_sub(1));
        let base = self.base;
        let empty = hi < self.base || self.slots.is_empty();
        self.slots
            .iter()
            .enumerate()
            .skip(if empty { usize::MAX } else { from })
            .take_while(move |(i, _)| *i <= to)
            .filter(|(_, s)| s.is_some())
            .map(move |(i, _)| base + i as u64)
    }

    /// Ids present with their values, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .filter_map(move |(i, s)| s.as_ref().map(|o| (base + i as u64, o)))
    }

    /// Values present, by ascending id.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().flatten()
    }

    /// Everything, oldest first; leaves the ring empty.
    pub fn take_all(&mut self) -> Vec<T> {
        self.len = 0;
        std::mem::take(&mut self.slots)
            .into_iter()
            .flatten()
            .collect()
    }
}

impl<T> Default for IdRing<T> {
    fn default() -> Self {
        Self {
            base: 0,
            slots: VecDeque::new(),
            len: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IdRing;

    #[test]
    fn removes_out_of_order_and_shrinks_from_the_oldest() {
        let mut r = IdRing::default();
        for id in [5u64, 6, 8] {
            r.insert(id, id * 10);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.first_id(), Some(5));
        assert_eq!(r.ids_in(0, 100).collect::<Vec<_>>(), vec![5, 6, 8]);
        assert_eq!(r.remove(6), Some(60));
        assert_eq!(r.remove(6), None);
        assert_eq!(r.first_id(), Some(5));
        assert_eq!(r.remove(5), Some(50));
        assert_eq!(r.first_id(), Some(8), "empty slots before the oldest go");
        assert_eq!(r.remove(4), None);
        assert_eq!(r.remove(1000), None);
        assert_eq!(r.take_all(), vec![80]);
        assert_eq!(r.len(), 0);
        assert_eq!(r.first_id(), None);
    }
}
