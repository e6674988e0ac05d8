// Package replicator is the domain of nbdmirror: resources, their roles,
// connection and disk states, the write path, resync and split-brain
// decisions (DESIGN.md §4, §7). It brings together the configuration
// (replicator/config), the local disk (blockdev), the metadata (metadisk,
// bitmap) and the peer link (transport).
//
// OpenMetaDevice finds and locks a resource's metadata as its configuration
// places it; the offline verbs (create-md, dump-md, apply-al) use it
// without a daemon.
package replicator
