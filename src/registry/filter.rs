//! A client's op filter, and the op lists of its Sub and Unsub frames.
//!
//! A Sub/Unsub body is parsed into an [`OpList`] — at most [`MAX_FILTER_OPS`] ops,
//! sorted and deduplicated — *before* the bucket's lock is taken; a longer list is
//! refused as soon as parsing passes the cap. Under the lock, [`OpFilter::sub`] and
//! [`OpFilter::unsub`] merge or subtract two sorted lists in one linear pass, so
//! the time a client can hold its bucket's lock is bounded by the cap, whatever
//! `client.max_body` allows.

/// Most ops one filter lists (in its accepted or its excluded set), and most ops
/// one Sub or Unsub may name.
pub const MAX_FILTER_OPS: usize = 1024;

/// A Sub or Unsub would make the filter list more than [`MAX_FILTER_OPS`] ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("op filter would hold more than {MAX_FILTER_OPS} ops")]
pub struct FilterFull;

/// Why a Sub or Unsub body is not an op list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpListError {
    /// The body is not UTF-8.
    #[error("ops are not UTF-8")]
    NotUtf8,
    /// An item between commas is not a u32.
    #[error("{0:?} is not an op number")]
    NotAnOp(String),
    /// The list names more ops than a filter can hold.
    #[error("more than {MAX_FILTER_OPS} ops in one list")]
    TooMany,
}

/// Ops from one Sub or Unsub: sorted, without duplicates, at most
/// [`MAX_FILTER_OPS`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpList(Vec<u32>);

impl OpList {
    /// Parses goim's comma-separated op numbers (blank items are skipped). Parsing
    /// stops at the first item past the cap.
    pub fn parse(body: &[u8]) -> Result<OpList, OpListError> {
        let text = std::str::from_utf8(body).map_err(|_| OpListError::NotUtf8)?;
        let mut ops = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if ops.len() == MAX_FILTER_OPS {
                return Err(OpListError::TooMany);
            }
            let op = item
                .parse::<u32>()
                .map_err(|_| OpListError::NotAnOp(item.chars().take(32).collect()))?;
            ops.push(op);
        }
        Ok(OpList::sorted(ops))
    }

    /// The list of `ops`, or [`FilterFull`] if it names more than the cap.
    pub fn new(ops: Vec<u32>) -> Result<OpList, FilterFull> {
        let list = OpList::sorted(ops);
        if list.0.len() > MAX_FILTER_OPS {
            return Err(FilterFull);
        }
        Ok(list)
    }

    fn sorted(mut ops: Vec<u32>) -> OpList {
        ops.sort_unstable();
        ops.dedup();
        OpList(ops)
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.0
    }
}

/// The ops a client accepts.
///
/// Built from the token's `accepts` (empty = every op). Sub adds ops, Unsub removes
/// them: on an every-op filter Unsub excludes ops and Sub takes exclusions back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpFilter {
    /// Every op except these (sorted).
    All { except: Vec<u32> },
    /// Only these ops (sorted).
    Only(Vec<u32>),
}

impl Default for OpFilter {
    fn default() -> Self {
        OpFilter::All { except: Vec::new() }
    }
}

/// The sorted union of two sorted lists, or [`FilterFull`] (and `list` unchanged)
/// if it would pass the cap.
fn union(list: &mut Vec<u32>, ops: &[u32]) -> Result<(), FilterFull> {
    let mut out = Vec::with_capacity((list.len() + ops.len()).min(MAX_FILTER_OPS + 1));
    let (mut a, mut b) = (list.iter().peekable(), ops.iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(&&x), Some(&&y)) if x < y => a.next(),
            (Some(&&x), Some(&&y)) if y < x => b.next(),
            (Some(_), Some(_)) => {
                b.next();
                a.next()
            }
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => break,
        };
        if out.len() == MAX_FILTER_OPS {
            return Err(FilterFull);
        }
        out.extend(next);
    }
    *list = out;
    Ok(())
}

/// Removes the sorted `ops` from the sorted `list` in one pass.
fn subtract(list: &mut Vec<u32>, ops: &[u32]) {
    let mut j = 0;
    list.retain(|&x| {
        while j < ops.len() && ops[j] < x {
            j += 1;
        }
        !(j < ops.len() && ops[j] == x)
    });
}

impl OpFilter {
    /// The filter for a token's accepts list: empty means every op.
    pub fn new(ops: Vec<u32>) -> Self {
        if ops.is_empty() {
            return OpFilter::default();
        }
        let mut ops = OpList::sorted(ops).0;
        ops.truncate(MAX_FILTER_OPS);
        OpFilter::Only(ops)
    }

    #[inline]
    pub fn accepts(&self, op: u32) -> bool {
        match self {
            OpFilter::All { except } => except.is_empty() || except.binary_search(&op).is_err(),
            OpFilter::Only(ops) => ops.binary_search(&op).is_ok(),
        }
    }

    /// Sub: the client wants these ops too.
    pub fn sub(&mut self, ops: &OpList) -> Result<(), FilterFull> {
        match self {
            OpFilter::All { except } => {
                subtract(except, ops.as_slice());
                Ok(())
            }
            OpFilter::Only(list) => union(list, ops.as_slice()),
        }
    }

    /// Unsub: the client no longer wants these ops.
    pub fn unsub(&mut self, ops: &OpList) -> Result<(), FilterFull> {
        match self {
            OpFilter::All { except } => union(except, ops.as_slice()),
            OpFilter::Only(list) => {
                subtract(list, ops.as_slice());
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ops(v: &[u32]) -> OpList {
        OpList::new(v.to_vec()).unwrap()
    }

    #[test]
    fn filter_on_every_op_excludes_and_readmits() {
        let mut f = OpFilter::new(vec![]);
        assert!(f.accepts(1) && f.accepts(5000));
        f.unsub(&ops(&[1000])).unwrap();
        assert!(!f.accepts(1000) && f.accepts(1001));
        f.sub(&ops(&[1000])).unwrap();
        assert!(f.accepts(1000));
    }

    #[test]
    fn filter_size_is_capped() {
        let mut f = OpFilter::new(vec![1]);
        let many = OpList::new((0..MAX_FILTER_OPS as u32).collect()).unwrap();
        assert_eq!(f.sub(&many), Ok(()));
        assert_eq!(f.sub(&ops(&[99_999])), Err(FilterFull));
        assert!(!f.accepts(99_999), "a refused Sub changes nothing");
        let mut all = OpFilter::default();
        assert_eq!(all.unsub(&many), Ok(()));
        assert_eq!(all.unsub(&ops(&[99_999])), Err(FilterFull));
        assert!(all.accepts(99_999), "a refused Unsub changes nothing");
    }

    #[test]
    fn parsing_stops_at_the_cap() {
        let fits: Vec<String> = (0..MAX_FILTER_OPS).map(|i| i.to_string()).collect();
        assert_eq!(
            OpList::parse(fits.join(",").as_bytes())
                .unwrap()
                .as_slice()
                .len(),
            MAX_FILTER_OPS
        );
        // One more item is refused, even if what follows is not a number at all.
        let over = format!("{},1,x", fits.join(","));
        assert_eq!(OpList::parse(over.as_bytes()), Err(OpListError::TooMany));
        assert_eq!(
            OpList::parse(b"1, 2,,x"),
            Err(OpListError::NotAnOp("x".into()))
        );
        assert_eq!(OpList::parse(b"\xff"), Err(OpListError::NotUtf8));
        assert_eq!(OpList::parse(b" 3,1,3, ,2").unwrap(), ops(&[1, 2, 3]));
    }

    #[test]
    fn merge_and_subtract_match_a_naive_model() {
        // A small deterministic generator instead of a dependency.
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % 64
        };
        let mut f = OpFilter::Only(vec![]);
        let mut g = OpFilter::default();
        let mut only = std::collections::BTreeSet::new();
        let mut except = std::collections::BTreeSet::new();
        for round in 0..500 {
            let list: Vec<u32> = (0..next() % 8).map(|_| next()).collect();
            let l = OpList::new(list.clone()).unwrap();
            if round % 2 == 0 {
                f.sub(&l).unwrap();
                g.sub(&l).unwrap();
                only.extend(list.iter().copied());
                list.iter().for_each(|o| {
                    except.remove(o);
                });
            } else {
                f.unsub(&l).unwrap();
                g.unsub(&l).unwrap();
                list.iter().for_each(|o| {
                    only.remove(o);
                });
                except.extend(list.iter().copied());
            }
            assert_eq!(f, OpFilter::Only(only.iter().copied().collect()));
            assert_eq!(
                g,
                OpFilter::All {
                    except: except.iter().copied().collect()
                }
            );
        }
    }
}
