//! The search of one key's history: iterative depth-first, over dancing links, with a memo of the
//! configurations searched. The parent module says what it decides and why each narrowing is safe.

use std::collections::HashSet;

use super::{Action, KeyHistory, Op, Value, ABSENT, NEVER, REPORT_OPS_MAX};

/// End of a linked list.
const NIL: usize = usize::MAX;

/// The head node of both linked lists; it stands for no operation.
const HEAD: usize = 0;

/// Where the search gave up on a key, deepest first found.
pub(super) struct DeadEnd {
    /// Known-outcome operations placed.
    pub(super) placed: usize,
    /// The register value after them.
    pub(super) value: Value,
    /// The last operations placed, oldest first.
    pub(super) last_placed: Vec<usize>,
    /// Known-outcome operations that could have been placed next and were tried.
    pub(super) pending: Vec<usize>,
    /// The operation whose return bounds what can be placed next.
    pub(super) first_return: usize,
}

/// How the search of one key ended.
pub(super) enum Outcome {
    Linearizable,
    /// Every order was tried; this is where it got furthest.
    Stuck(DeadEnd),
    /// The step budget ran out; `placed_max` is the longest prefix found.
    OutOfSteps {
        placed_max: usize,
    },
}

/// A position among the candidates to place next.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// At this node of the known list: candidates are its calls before the first return.
    Known(usize),
    /// At this node of the unknown list: candidates are the operations invoked by `bound`, the time
    /// of the first return still in the known list (invokes at that same instant are concurrent).
    Unknown { node: usize, bound: u64 },
    /// Past the last candidate, or at a node whose only option was an observer (see [`Frame::forced`]).
    Done,
}

/// One operation placed, and how to resume trying the alternatives when it leads nowhere.
struct Frame {
    /// The operation, an index into [`KeyHistory::ops`].
    op: usize,
    /// The register value before it.
    value_before: Value,
    /// Whether it had to justify an unknown write placed just before it (`Some` of the value that
    /// write replaced), see [`Search::place`].
    unjustified_before: Option<Value>,
    /// The cursor that offered it.
    at: Cursor,
    /// It was an observer that could be placed as soon as its node was reached, so no other
    /// candidate of that node needs trying (see [`Search::observer`]).
    forced: bool,
}

pub(super) struct Search<'k, 'h> {
    /// The operations, as in [`KeyHistory::ops`].
    ops: &'k [Op<'h>],
    /// How many of them have a known outcome.
    known: usize,
    /// Links of the known list: [`HEAD`], then the calls and returns of known-outcome operations
    /// by time, calls before returns at the same instant (they are concurrent: the conservative
    /// choice). Nodes taken out keep their links, which is how they are put back.
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The operation of each node of the known list.
    node_op: Vec<usize>,
    /// Whether the node is a return (else a call).
    node_is_return: Vec<bool>,
    /// The time of the node.
    node_time: Vec<u64>,
    /// Node of the call of each known operation.
    call_node: Vec<usize>,
    /// Node of the return of each known operation.
    return_node: Vec<usize>,
    /// Links of the unknown list: [`HEAD`], then node `i + 1` for operation `known + i`, by invoke.
    unknown_next: Vec<usize>,
    unknown_prev: Vec<usize>,
    /// Placed known-outcome operations, one bit each.
    known_bits: Vec<u64>,
    /// Placed unknown-outcome operations, one bit each.
    unknown_bits: Vec<u64>,
}

impl<'k, 'h> Search<'k, 'h> {
    pub(super) fn new(history: &'k KeyHistory<'h>) -> Self {
        let ops = &history.ops[..];
        let known = history.known;
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * known);
        for (i, op) in ops[..known].iter().enumerate() {
            events.push((op.invoke, false, i));
            events.push((op.ret, true, i));
        }
        events.sort_unstable();
        let nodes = events.len() + 1;
        let mut search = Search {
            ops,
            known,
            next: (1..=nodes).map(|n| if n == nodes { NIL } else { n }).collect(),
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
            node_op: vec![NIL; nodes],
            node_is_return: vec![false; nodes],
            node_time: vec![0; nodes],
            call_node: vec![NIL; known],
            return_node: vec![NIL; known],
            unknown_next: Vec::new(),
            unknown_prev: Vec::new(),
            known_bits: vec![0; known.div_ceil(64)],
            unknown_bits: vec![0; (ops.len() - known).div_ceil(64)],
        };
        for (n, &(time, is_return, op)) in events.iter().enumerate() {
            let node = n + 1;
            search.node_op[node] = op;
            search.node_is_return[node] = is_return;
            search.node_time[node] = time;
            if is_return {
                search.return_node[op] = node;
            } else {
                search.call_node[op] = node;
            }
        }
        let unknown_nodes = ops.len() - known + 1;
        search.unknown_next = (1..=unknown_nodes)
            .map(|n| if n == unknown_nodes { NIL } else { n })
            .collect();
        search.unknown_prev = (0..unknown_nodes).map(|n| n.wrapping_sub(1)).collect();
        search
    }

    /// Searches depth first, without recursion: `stack` holds the operations placed so far.
    pub(super) fn run(mut self, step_budget: u64) -> Outcome {
        let mut memo: HashSet<Box<[u64]>> = HashSet::new();
        let mut memo_key: Vec<u64> = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut value = ABSENT;
        let mut unjustified: Option<Value> = None;
        let mut placed = 0;
        let mut deepest: Option<DeadEnd> = None;
        let mut steps = 0;
        // Just arrived at a node: try an observer before enumerating the candidates.
        let mut entering = true;
        let mut cursor = Cursor::Done;
        loop {
            if self.next[HEAD] == NIL {
                return Outcome::Linearizable;
            }
            let mut offered = None;
            if entering {
                entering = false;
                offered = self.observer(value, unjustified).map(|(op, at)| (op, at, true));
                cursor = Cursor::Known(self.next[HEAD]);
            }
            if offered.is_none() {
                offered = self.candidate(cursor).map(|(op, at)| (op, at, false));
            }
            let Some((op, at, forced)) = offered else {
                // Dead end: undo the last operation placed and try the next candidate of its node.
                let deeper = match &deepest {
                    Some(dead_end) => placed > dead_end.placed,
                    None => true,
                };
                if deeper {
                    deepest = Some(self.dead_end(placed, value, &stack));
                }
                let Some(frame) = stack.pop() else {
                    return Outcome::Stuck(deepest.expect("a dead end was just recorded"));
                };
                self.unlift(frame.op);
                self.mark(frame.op, false);
                value = frame.value_before;
                unjustified = frame.unjustified_before;
                placed -= usize::from(frame.op < self.known);
                cursor = if frame.forced {
                    Cursor::Done
                } else {
                    self.advance(frame.at)
                };
                continue;
            };
            if steps == step_budget {
                let placed_max = deepest.map_or(placed, |d| d.placed.max(placed));
                return Outcome::OutOfSteps { placed_max };
            }
            steps += 1;
            if let Some((value_after, unjustified_after)) = self.place(op, value, unjustified) {
                self.mark(op, true);
                self.fill_memo_key(value_after, unjustified_after, &mut memo_key);
                if !memo.contains(memo_key.as_slice()) {
                    memo.insert(memo_key.clone().into_boxed_slice());
                    stack.push(Frame {
                        op,
                        value_before: value,
                        unjustified_before: unjustified,
                        at,
                        forced,
                    });
                    self.lift(op);
                    value = value_after;
                    unjustified = unjustified_after;
                    placed += usize::from(op < self.known);
                    entering = true;
                    continue;
                }
                self.mark(op, false);
            }
            // An observer leading to a configuration searched already: so does every order from here.
            cursor = if forced { Cursor::Done } else { self.advance(at) };
        }
    }

    /// An operation that can be placed now without changing the value (a read of the current value,
    /// a cas refused by it), if any. It can go first: in any linearization that places it later,
    /// moving it here changes what no other operation sees, and breaks no real-time order since it
    /// is a candidate now (nothing pending returned before its invoke). So at a node that has one,
    /// it is the only branch worth trying; with reads a large share of a workload, this is what
    /// keeps the search narrow when many clients overlap.
    fn observer(&self, value: Value, unjustified: Option<Value>) -> Option<(usize, Cursor)> {
        let mut cursor = Cursor::Known(self.next[HEAD]);
        while let Some((op, at)) = self.candidate(cursor) {
            if op >= self.known {
                return None;
            }
            let observes = matches!(self.ops[op].action, Action::Get(_) | Action::CasRefused { .. });
            if observes && self.place(op, value, unjustified).is_some() {
                return Some((op, at));
            }
            cursor = self.advance(at);
        }
        None
    }

    /// Whether `op` can be placed next on `value`, and if so the value after it and whether it is an
    /// unknown write that the next operation must justify (`Some` of the value it replaced).
    /// `unjustified` is that of the operation placed last.
    fn place(&self, op: usize, value: Value, unjustified: Option<Value>) -> Option<(Value, Option<Value>)> {
        let action = self.ops[op].action;
        let value_after = action.apply(value)?;
        if unjustified.is_some_and(|before| !action.justifies(before, value)) {
            return None;
        }
        if op < self.known {
            return Some((value_after, None));
        }
        // Unknown outcome: only where it changes the value and something placeable next needs it
        // (the module doc says why nothing is lost). Checking here saves a step into a dead end.
        if value_after == value || !self.candidate_justifies(op, value, value_after) {
            return None;
        }
        Some((value_after, Some(value)))
    }

    /// Whether an operation other than `except` that could be placed next justifies an unknown
    /// write from `before` to `written`.
    fn candidate_justifies(&self, except: usize, before: Value, written: Value) -> bool {
        let mut cursor = Cursor::Known(self.next[HEAD]);
        while let Some((op, at)) = self.candidate(cursor) {
            if op != except && self.ops[op].action.justifies(before, written) {
                return true;
            }
            cursor = self.advance(at);
        }
        false
    }

    /// The first candidate at or after `cursor`: known-outcome operations first, then unknown ones.
    fn candidate(&self, mut cursor: Cursor) -> Option<(usize, Cursor)> {
        loop {
            match cursor {
                Cursor::Known(node) => {
                    // The known list is not empty here and ends with a return, so `node` is never NIL;
                    // should it be, no return bounds the unknown operations.
                    if node == NIL || self.node_is_return[node] {
                        let bound = if node == NIL { NEVER } else { self.node_time[node] };
                        cursor = Cursor::Unknown {
                            node: self.unknown_next[HEAD],
                            bound,
                        };
                        continue;
                    }
                    return Some((self.node_op[node], cursor));
                }
                Cursor::Unknown { node, bound } => {
                    if node == NIL {
                        return None;
                    }
                    let op = self.known + node - 1;
                    return (self.ops[op].invoke <= bound).then_some((op, cursor));
                }
                Cursor::Done => return None,
            }
        }
    }

    fn advance(&self, cursor: Cursor) -> Cursor {
        match cursor {
            Cursor::Known(node) => Cursor::Known(self.next[node]),
            Cursor::Unknown { node, bound } => Cursor::Unknown {
                node: self.unknown_next[node],
                bound,
            },
            Cursor::Done => Cursor::Done,
        }
    }

    /// Takes a placed operation out of its list; [`Self::unlift`] undoes it exactly, as lifts are
    /// undone in reverse order.
    fn lift(&mut self, op: usize) {
        if op < self.known {
            unlink(&mut self.next, &mut self.prev, self.call_node[op]);
            unlink(&mut self.next, &mut self.prev, self.return_node[op]);
        } else {
            unlink(&mut self.unknown_next, &mut self.unknown_prev, op - self.known + 1);
        }
    }

    fn unlift(&mut self, op: usize) {
        if op < self.known {
            relink(&mut self.next, &mut self.prev, self.return_node[op]);
            relink(&mut self.next, &mut self.prev, self.call_node[op]);
        } else {
            relink(&mut self.unknown_next, &mut self.unknown_prev, op - self.known + 1);
        }
    }

    fn mark(&mut self, op: usize, placed: bool) {
        let (bits, i) = if op < self.known {
            (&mut self.known_bits, op)
        } else {
            (&mut self.unknown_bits, op - self.known)
        };
        if placed {
            bits[i / 64] |= 1 << (i % 64);
        } else {
            bits[i / 64] &= !(1 << (i % 64));
        }
    }

    /// The memo key of a configuration: the value, whether an unknown write awaits justification
    /// (it narrows what may come next, so it is part of the configuration), then the placed set.
    /// Known-outcome operations are placed almost in invoke order, so their bits are all ones up to
    /// a frontier and all zeros a little after it: only the words in between are stored, after the
    /// index of the first. This keeps a key a few words long however long the history, which is
    /// what lets the memo grow to millions of entries. The unknown bits, a few words at most, are
    /// stored whole; their length is the same in every key, so two keys are equal exactly when their
    /// configurations are.
    fn fill_memo_key(&self, value: Value, unjustified: Option<Value>, key: &mut Vec<u64>) {
        let bits = &self.known_bits;
        let low = bits.iter().position(|&word| word != !0).unwrap_or(bits.len());
        let high = bits
            .iter()
            .rposition(|&word| word != 0)
            .map_or(0, |last| last + 1)
            .max(low);
        key.clear();
        key.push(u64::from(value));
        key.push(unjustified.map_or(0, |before| u64::from(before) + 1));
        key.push(low as u64);
        key.extend_from_slice(&bits[low..high]);
        key.extend_from_slice(&self.unknown_bits);
    }

    fn dead_end(&self, placed: usize, value: Value, stack: &[Frame]) -> DeadEnd {
        let last_placed = stack[stack.len().saturating_sub(REPORT_OPS_MAX)..]
            .iter()
            .map(|f| f.op)
            .collect();
        let mut pending = Vec::new();
        let mut node = self.next[HEAD];
        while node != NIL && !self.node_is_return[node] {
            if pending.len() < REPORT_OPS_MAX {
                pending.push(self.node_op[node]);
            }
            node = self.next[node];
        }
        let first_return = if node == NIL {
            self.node_op[self.next[HEAD]]
        } else {
            self.node_op[node]
        };
        DeadEnd {
            placed,
            value,
            last_placed,
            pending,
            first_return,
        }
    }
}

fn unlink(next: &mut [usize], prev: &mut [usize], node: usize) {
    let (before, after) = (prev[node], next[node]);
    next[before] = after;
    if after != NIL {
        prev[after] = before;
    }
}

fn relink(next: &mut [usize], prev: &mut [usize], node: usize) {
    let (before, after) = (prev[node], next[node]);
    next[before] = node;
    if after != NIL {
        prev[after] = node;
    }
}
