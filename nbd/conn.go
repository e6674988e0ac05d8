package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// readBufSize is the read-ahead of a connection in transmission: large
// enough to pick up a dozen pipelined 4 KiB writes per system call.
const readBufSize = 64 << 10

// errStopped ends the request loop of a connection whose server is shutting down.
var errStopped = errors.New("nbd: connection stopped by server shutdown")

// conn is one client connection. The serve goroutine negotiates, then reads
// requests and starts one handler goroutine per request; replies are written
// by whichever goroutine holds the replyWriter (see reply.go).
type conn struct {
	srv    *Server
	nc     net.Conn
	log    *slog.Logger
	remote string
	since  time.Time
	export *Export // set before transmission starts
	// negotiates: the connection starts with a negotiation (not a kernel
	// attach, which comes with its export).
	negotiates bool

	mu       sync.Mutex
	inXmit   bool    // transmission phase reached
	chosen   *Export // the export the client was told it may use (it counts as a client from then on)
	stopping bool    // Shutdown asked the connection to end
	killed   bool    // Close ended the connection
	evicted  bool    // closed while negotiating to make room for a new one

	lim      budget         // this connection's in-flight requests and bytes
	inShare  atomic.Int64   // in-flight bytes taken from its share (connShare), not the server's budget
	work     chan work      // validated requests for the workers
	workers  int            // workers started (owned by the reader)
	handlers sync.WaitGroup // running workers
	out      replyWriter
	dirty    atomic.Bool // a write completed since the last flush
	failures atomic.Int64
}

func newConn(s *Server, nc net.Conn, exp *Export) *conn {
	c := &conn{srv: s, nc: nc, remote: remoteAddr(nc), since: time.Now(), export: exp, negotiates: exp == nil}
	c.log = s.log.With("remote", c.remote)
	c.lim.init(s.MaxInFlight, s.MaxInFlightBytes)
	c.work = make(chan work) // unbuffered: a request goes only to a worker that is free
	c.out.c = c
	return c
}

func (c *conn) info() Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	ci := Conn{Remote: c.remote, Since: c.since}
	switch {
	case c.inXmit:
		ci.Export = c.export.Name
	case c.chosen != nil:
		ci.Export = c.chosen.Name
	}
	return ci
}

// serve runs the connection to its end and unregisters it.
func (c *conn) serve() {
	defer c.srv.connDone(c)
	if c.export == nil {
		exp, err := c.negotiate()
		if err != nil {
			c.nc.Close()
			stopping, _ := c.wasStopped()
			switch {
			case c.wasEvicted():
				c.log.Debug("nbd negotiation cut short to make room for a new connection", "err", err)
			case stopping:
				c.log.Debug("nbd negotiation cut short by the server's stop", "err", err)
			case errors.Is(err, errAborted) || errors.Is(err, io.EOF):
				c.log.Debug("nbd negotiation ended by client", "err", err)
			default:
				c.log.Info("nbd negotiation failed", "err", err)
			}
			return
		}
		c.export = exp
	}
	if !c.startTransmission() {
		c.nc.Close()
		return
	}
	c.log.Debug("nbd client connected", "export", c.export.Name)
	err := c.requests()
	c.finish(err)
}

func (c *conn) negotiate() (*Export, error) {
	if err := c.nc.SetDeadline(time.Now().Add(c.srv.HandshakeTimeout)); err != nil {
		return nil, fmt.Errorf("set handshake deadline: %w", err)
	}
	exp, err := negotiate(c.nc, c.srv.Catalog, c.log, func(e *Export) {
		c.mu.Lock()
		c.chosen = e
		c.mu.Unlock()
	})
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			err = fmt.Errorf("client stalled in negotiation for %v: %w", c.srv.HandshakeTimeout, err)
		}
		return nil, err
	}
	return exp, nil
}

// startTransmission clears the handshake deadline and enters transmission,
// unless a shutdown came first.
func (c *conn) startTransmission() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping {
		return false
	}
	if err := c.nc.SetDeadline(time.Time{}); err != nil && !errors.Is(err, os.ErrNoDeadline) {
		return false
	}
	c.inXmit = true
	return true
}

// negotiatingSince reports when a connection still negotiating (no export
// chosen, not stopping) began.
func (c *conn) negotiatingSince() (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.since, c.negotiatingLocked()
}

// negotiatingLocked: no export chosen yet, and neither stopping nor
// evicted. Call with c.mu held.
func (c *conn) negotiatingLocked() bool {
	return !c.inXmit && c.chosen == nil && !c.stopping && !c.evicted && c.negotiates
}

// evict closes a connection still negotiating (Server.evictStalledLocked);
// it reports false if the connection got further meanwhile.
func (c *conn) evict() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.negotiatingLocked() {
		return false
	}
	c.evicted = true
	c.nc.Close()
	return true
}

func (c *conn) wasEvicted() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.evicted
}

// stop asks the connection to end gracefully (Server.Shutdown).
func (c *conn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	if c.inXmit {
		// Wake the request reader; requests already read still finish.
		c.nc.SetReadDeadline(time.Unix(1, 0))
	} else {
		c.nc.Close()
	}
}

// kill ends the connection at once (Server.Close).
func (c *conn) kill() {
	c.mu.Lock()
	c.stopping, c.killed = true, true
	c.mu.Unlock()
	c.nc.Close()
	c.lim.close()
}

func (c *conn) wasStopped() (stopping, killed bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopping, c.killed
}

// requests reads requests until DISC, the end of the connection or an
// error, and dispatches them. It returns nil for a client's DISC.
func (c *conn) requests() error {
	br := bufio.NewReaderSize(c.nc, readBufSize)
	exp, be := c.export, c.export.Backend
	var hdr [requestSize]byte
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return c.readErr(err)
		}
		req, err := decodeRequest(&hdr)
		if err != nil {
			return fmt.Errorf("request: %w", err)
		}
		if req.Type == CmdDisc {
			return nil
		}
		v := validate(&req, exp, uint64(be.Size()))
		if v.drop {
			return fmt.Errorf("%s of %d bytes exceeds %d: dropping client", cmdName(req.Type), req.Length, maxDrain)
		}
		var bytes int64 // a refused request holds no payload (a refused write's is discarded)
		if v.errno == 0 && (req.Type == CmdRead || req.Type == CmdWrite) {
			bytes = int64(req.Length)
		}
		cost, ok := c.acquire(bytes)
		if !ok {
			return errStopped
		}
		if v.errno != 0 {
			if req.Type == CmdWrite {
				if _, err := br.Discard(int(req.Length)); err != nil {
					c.release(cost)
					return c.readErr(err)
				}
			}
			c.log.Debug("nbd request refused", "cmd", cmdName(req.Type), "offset", req.Offset,
				"length", req.Length, "flags", req.Flags, "err", v.errno)
			began := c.observeStart(req.Type)
			c.out.send(reply{cookie: req.Cookie, errno: v.errno, cost: cost})
			c.observeDone(req.Type, began, true)
			continue
		}
		var payload *[]byte
		if req.Type == CmdWrite {
			payload = c.srv.pool.get(int(req.Length))
			if _, err := io.ReadFull(br, *payload); err != nil {
				c.srv.pool.put(payload)
				c.release(cost)
				return c.readErr(err)
			}
		}
		// Observed once read whole: a connection that ends mid-payload
		// leaves no request in flight.
		c.dispatch(work{req: req, payload: payload, cost: cost, began: c.observeStart(req.Type)})
	}
}

// observeStart tells the server's Observer a request of type cmd was read
// (with its payload) and returns when (the zero time without an Observer).
func (c *conn) observeStart(cmd uint16) time.Time {
	if c.srv.Observer == nil {
		return time.Time{}
	}
	c.srv.Observer.RequestStarted(c.export.Name, cmdName(cmd))
	return time.Now()
}

// observeDone tells the server's Observer a request read at began has its
// reply queued.
func (c *conn) observeDone(cmd uint16, began time.Time, failed bool) {
	if c.srv.Observer == nil {
		return
	}
	c.srv.Observer.RequestDone(c.export.Name, cmdName(cmd), time.Since(began), failed)
}

// work is one validated request for a worker.
type work struct {
	req     Request
	payload *[]byte // WRITE data
	cost    charge
	began   time.Time // when it was read (for the Observer)
}

// dispatch hands a request to a free worker, or starts one with it, so no
// request waits behind a slow one while fewer than MaxInFlight run. Workers
// live as long as the connection, so their stacks stay grown and a request
// usually costs no goroutine start.
func (c *conn) dispatch(w work) {
	c.out.dispatched()
	select {
	case c.work <- w:
		return
	default:
	}
	if c.workers < c.srv.MaxInFlight {
		c.workers++
		c.handlers.Add(1)
		go c.worker(w)
		return
	}
	c.work <- w
}

// worker handles first, then whatever dispatch hands it until the work
// channel closes.
func (c *conn) worker(first work) {
	defer c.handlers.Done()
	for w, ok := first, true; ok; w, ok = <-c.work {
		c.out.started()
		c.handle(w.req, w.payload, w.cost, w.began)
	}
}

// readErr classifies the error that ended reading.
func (c *conn) readErr(err error) error {
	if stopping, _ := c.wasStopped(); stopping {
		return errStopped
	}
	return err
}

// connShare is the in-flight payload a connection may hold without drawing
// on the server-wide budget (MaxTotalInFlightBytes), so that connections
// which hold that budget whole (clients that flood requests and read no
// reply) cannot stop the others: each keeps at least this much in flight.
// Memory is bounded by MaxTotalInFlightBytes + MaxConns × connShare.
const connShare = 256 << 10

// charge is what one request holds of the in-flight budgets: its bytes
// (of the connection's budget), of which shared come from the server's
// and the rest from the connection's own share.
type charge struct {
	bytes, shared int64
}

// acquire waits until a request of the given payload size fits in the
// connection's budget and then in the server's, taking what it can from
// the connection's share first. While it waits for the server's budget,
// the connection's own requests that end give their share back, and it
// takes that instead (release lowers inShare before it wakes the server
// budget's waiters). It reports false if the connection or the server was
// closed meanwhile.
func (c *conn) acquire(bytes int64) (charge, bool) {
	if !c.lim.acquire(bytes) {
		return charge{}, false
	}
	// Only this (the reading) goroutine adds to inShare, so it never
	// exceeds connShare; releases only lower it meanwhile.
	var own int64
	shared, ok := c.srv.total.acquireAs(func() int64 {
		own = min(bytes, max(0, connShare-c.inShare.Load()))
		return bytes - own
	})
	if !ok {
		c.lim.release(bytes)
		return charge{}, false
	}
	c.inShare.Add(own)
	return charge{bytes: bytes, shared: shared}, true
}

func (c *conn) release(ch charge) {
	c.inShare.Add(ch.shared - ch.bytes)
	c.srv.total.release(ch.shared)
	c.lim.release(ch.bytes)
}

// handle executes one validated request and queues its reply.
func (c *conn) handle(req Request, payload *[]byte, cost charge, began time.Time) {
	be := c.export.Backend
	r := reply{cookie: req.Cookie, cost: cost}
	fua, noHole := req.Flags&CmdFlagFUA != 0, req.Flags&CmdFlagNoHole != 0
	off, n := int64(req.Offset), int64(req.Length)
	var err error
	switch req.Type {
	case CmdRead:
		buf := c.srv.pool.get(int(n))
		var got int
		got, err = be.ReadAt(*buf, off)
		if err == nil && got < len(*buf) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			c.srv.pool.put(buf)
		} else {
			r.data = buf
		}
	case CmdWrite:
		err = be.WriteAt(*payload, off, fua)
		c.srv.pool.put(payload)
		c.dirty.Store(true)
	case CmdFlush:
		// Cleared before the flush, so a write completing meanwhile
		// marks the connection dirty again; set again if it fails, so the
		// flush at disconnect still happens.
		c.dirty.Store(false)
		if err = be.Flush(); err != nil {
			c.dirty.Store(true)
		}
	case CmdTrim, CmdWriteZeroes:
		switch {
		case n == 0 && fua:
			err = be.Flush()
		case n == 0:
		case req.Type == CmdTrim:
			err = be.Trim(off, n, fua)
		default:
			err = be.WriteZeroes(off, n, noHole, fua)
		}
		c.dirty.Store(true)
	}
	if err != nil {
		r.errno = errnoOf(err)
		c.backendFailed(req, err)
	}
	c.out.send(r)
	c.observeDone(req.Type, began, err != nil)
}

// backendFailed logs the first backend error of the connection at Warn and
// the rest at Debug, so a failing disk does not flood the log.
func (c *conn) backendFailed(req Request, err error) {
	lvl := slog.LevelDebug
	if c.failures.Add(1) == 1 {
		lvl = slog.LevelWarn
	}
	c.log.Log(context.Background(), lvl, "nbd backend error", "export", c.export.Name, "cmd", cmdName(req.Type),
		"offset", req.Offset, "length", req.Length, "err", err)
}

// finish waits for the in-flight requests, flushes the export if anything was
// written (unless the server is closing hard) and closes the connection.
func (c *conn) finish(err error) {
	close(c.work)
	c.handlers.Wait()
	_, killed := c.wasStopped()
	if !killed && c.out.failed() == nil && c.dirty.Load() {
		if ferr := c.export.Backend.Flush(); ferr != nil {
			c.log.Warn("nbd flush at disconnect failed", "export", c.export.Name, "err", ferr)
		}
	}
	c.nc.Close()
	switch {
	case err == nil:
		c.log.Debug("nbd client disconnected", "export", c.export.Name)
	case errors.Is(err, errStopped) || killed:
		c.log.Debug("nbd connection closed by server", "export", c.export.Name)
	case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || c.out.failed() != nil:
		c.log.Debug("nbd client went away", "export", c.export.Name, "err", err)
	default:
		c.log.Warn("nbd connection dropped", "export", c.export.Name, "err", err)
	}
}
