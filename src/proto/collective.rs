//! The shape of the collective tree: member → node leader → coordinator
//! (the leader of node 0, first of the node-leader list) and back.
//!
//! Owns only the pure computation of one instance's parent and children
//! from what it knows of the structure (its leader, its node's members, the
//! node-leader list); the runtime and the simulator carry the messages.
//! Must not touch sockets, threads or the clock.

use super::Rank;

/// Where one instance sits in the tree of a collective call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectiveTree {
    /// Whom this instance sends its combined contribution to; `None` at the root.
    pub parent: Option<Rank>,
    /// Whose contributions it waits for, then sends the result to.
    pub children: Vec<Rank>,
}

/// The tree as seen by `me`: a member's parent is its `leader`; a leader's
/// children are its node's other `members`; the coordinator (first of
/// `node_leaders`) also has every other node leader as a child, and every
/// other leader has the coordinator as its parent. Without a known leader
/// (or a leader that does not know the node-leader list yet) `me` is its
/// own root.
pub fn collective_tree(
    me: Rank,
    leader: Option<Rank>,
    members: impl IntoIterator<Item = Rank>,
    node_leaders: &[Rank],
) -> CollectiveTree {
    let leader = leader.unwrap_or(me);
    if leader != me {
        return CollectiveTree {
            parent: Some(leader),
            children: Vec::new(),
        };
    }
    let mut children: Vec<Rank> = members.into_iter().filter(|&r| r != me).collect();
    let coordinator = node_leaders.first().copied().unwrap_or(me);
    if coordinator == me {
        children.extend(node_leaders.iter().copied().filter(|&r| r != me));
        CollectiveTree {
            parent: None,
            children,
        }
    } else {
        CollectiveTree {
            parent: Some(coordinator),
            children,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes {0, 1, 2} and {3, 4}: every rank is reached exactly once
    /// from the root, and parent/child links agree.
    #[test]
    fn every_instance_is_reached_once_and_links_agree() {
        let nodes: [&[Rank]; 2] = [&[0, 1, 2], &[3, 4]];
        let leaders = [0, 3];
        let tree = |me: Rank| {
            let node = nodes.iter().find(|n| n.contains(&me)).unwrap();
            let leaders: &[Rank] = if node[0] == me { &leaders } else { &[] };
            collective_tree(me, Some(node[0]), node.iter().copied(), leaders)
        };
        assert_eq!(tree(0).parent, None);
        let mut seen = vec![0];
        let mut todo = vec![0];
        while let Some(r) = todo.pop() {
            for c in tree(r).children {
                assert_eq!(tree(c).parent, Some(r), "child {c} of {r}");
                seen.push(c);
                todo.push(c);
            }
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }

    /// After a failover (rank 3 dead, 4 leads node 1), the survivors form
    /// a tree without the dead rank.
    #[test]
    fn a_failed_over_leader_is_a_child_of_the_coordinator() {
        let t = collective_tree(4, Some(4), [4], &[0, 4]);
        assert_eq!(t.parent, Some(0));
        assert!(t.children.is_empty());
        let root = collective_tree(0, Some(0), [0, 1, 2], &[0, 4]);
        assert_eq!(root.children, vec![1, 2, 4]);
        assert_eq!(collective_tree(7, None, [], &[]).parent, None);
    }
}
