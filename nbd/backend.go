package nbd

import (
	"errors"
	"sort"
	"sync"
	"syscall"
)

// Backend is the storage behind an export. The server calls its methods from
// many goroutines at once, for requests of one or several connections, so an
// implementation must be safe for concurrent use; overlapping requests may be
// in flight together (NBD gives them no order).
//
// Offsets and lengths are already checked against Size, so a Backend never sees
// a request that reaches past its end. Errors are mapped to NBD error values:
// an Errno is sent as is; ENOSPC, EDQUOT and EFBIG become ENOSPC; EROFS and
// EPERM become EPERM; EINVAL stays EINVAL; anything else becomes EIO.
type Backend interface {
	// Size is the export size in bytes. It is read at negotiation and for
	// every request's bounds check, so it may change (an online resize).
	Size() int64
	// ReadAt fills p from offset off; a short read is an error.
	// Implementations must not retain p after ReadAt returns.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off. With fua the data must be durable when
	// WriteAt returns. Implementations must not retain p after WriteAt
	// returns: the server reuses the buffer for the next request, so a
	// backend that queues the data (to a peer, say) must copy it.
	WriteAt(p []byte, off int64, fua bool) error
	// Flush makes every write that completed before Flush was called
	// durable, whichever connection it came from.
	Flush() error
	// Trim discards the range; its contents are undefined until rewritten.
	// It is advisory: a backend that cannot discard returns nil.
	Trim(off, length int64, fua bool) error
	// WriteZeroes makes the range read back as zeroes. Unless noHole is
	// set it may deallocate the range.
	WriteZeroes(off, length int64, noHole, fua bool) error
}

// The Backend methods take only basic types, so that a type satisfies the
// interface without importing this package.

// Export is one named disk the server offers.
type Export struct {
	Name        string
	Description string
	Backend     Backend
	// ReadOnly refuses WRITE, TRIM and WRITE_ZEROES with EPERM and
	// advertises NBD_FLAG_READ_ONLY.
	ReadOnly bool
	// MultiConn advertises NBD_FLAG_CAN_MULTI_CONN: a FLUSH on any
	// connection covers writes completed on all of them. It is true for
	// any Backend whose Flush honours its contract.
	MultiConn bool
	// MinBlockSize, PreferredBlockSize and MaxPayload are advertised in
	// NBD_INFO_BLOCK_SIZE; zero selects 1, 4096 and 32 MiB. Requests not
	// aligned to MinBlockSize are refused with EINVAL.
	MinBlockSize       uint32
	PreferredBlockSize uint32
	MaxPayload         uint32
}

// Default block-size constraints.
const (
	DefaultPreferredBlockSize = 4096
	DefaultMaxPayload         = 32 << 20
)

func (e *Export) minBlock() uint32 {
	if e.MinBlockSize == 0 {
		return 1
	}
	return e.MinBlockSize
}

func (e *Export) preferredBlock() uint32 {
	if e.PreferredBlockSize == 0 {
		return max(DefaultPreferredBlockSize, e.minBlock())
	}
	return e.PreferredBlockSize
}

func (e *Export) maxPayload() uint32 {
	if e.MaxPayload == 0 {
		return DefaultMaxPayload
	}
	return e.MaxPayload
}

// validate checks the export's constraints against the protocol's rules.
func (e *Export) validate() error {
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	switch {
	case e.Backend == nil:
		return errors.New("nbd: export " + e.Name + " has no backend")
	case len(e.Name) > maxStringLen:
		return errors.New("nbd: export name longer than 4096 bytes")
	case !pow2(e.minBlock()) || e.minBlock() > 64<<10:
		return errors.New("nbd: minimum block size must be a power of 2 up to 64 KiB")
	case !pow2(e.preferredBlock()) || e.preferredBlock() < max(e.minBlock(), 512):
		return errors.New("nbd: preferred block size must be a power of 2 of at least max(minimum, 512)")
	case e.maxPayload() < e.preferredBlock() || e.maxPayload() > maxPayloadLimit:
		return errors.New("nbd: maximum payload must lie between the preferred block size and 64 MiB")
	}
	return nil
}

// Flags returns the transmission flags advertised for the export.
func (e *Export) Flags() uint16 {
	f := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes
	if e.ReadOnly {
		f |= FlagReadOnly
	}
	if e.MultiConn {
		f |= FlagCanMultiConn
	}
	return f
}

// Catalog tells the server which exports exist. Lookup is called for every
// NBD_OPT_INFO, NBD_OPT_GO and NBD_OPT_EXPORT_NAME; an empty name asks for the
// default export. A Lookup error is shown to the client as NBD_REP_ERR_UNKNOWN
// with the error's text, so it should say why (for example that the resource
// is Secondary). Implementations must be safe for concurrent use.
type Catalog interface {
	Lookup(name string) (*Export, error)
	// List returns the names and descriptions offered to NBD_OPT_LIST.
	List() []*Export
}

// ErrUnknownExport is returned by a Catalog for a name it does not know.
var ErrUnknownExport = errors.New("nbd: no such export")

// Exports is a Catalog of a fixed set of exports, safe for concurrent use.
// The zero value is empty; Add and Remove change it at run time.
type Exports struct {
	mu      sync.RWMutex
	byName  map[string]*Export
	Default string // the export that answers to the empty name, if any
}

// Add adds or replaces an export.
func (c *Exports) Add(e *Export) error {
	if err := e.validate(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byName == nil {
		c.byName = make(map[string]*Export)
	}
	c.byName[e.Name] = e
	return nil
}

// Remove removes an export; connections already using it are not affected.
func (c *Exports) Remove(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.byName, name)
}

// Lookup implements Catalog.
func (c *Exports) Lookup(name string) (*Export, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if name == "" {
		name = c.Default
	}
	if e, ok := c.byName[name]; ok {
		return e, nil
	}
	return nil, ErrUnknownExport
}

// List implements Catalog, sorted by name.
func (c *Exports) List() []*Export {
	c.mu.RLock()
	defer c.mu.RUnlock()
	l := make([]*Export, 0, len(c.byName))
	for _, e := range c.byName {
		l = append(l, e)
	}
	sort.Slice(l, func(i, j int) bool { return l[i].Name < l[j].Name })
	return l
}

// errnoOf maps a backend error to the NBD error value sent to the client.
func errnoOf(err error) Errno {
	var e Errno
	if errors.As(err, &e) {
		return e
	}
	var se syscall.Errno
	if errors.As(err, &se) {
		switch se {
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EROFS, syscall.EPERM:
			return EPERM
		case syscall.EINVAL:
			return EINVAL
		case syscall.ENOMEM:
			return ENOMEM
		}
	}
	return EIO
}
