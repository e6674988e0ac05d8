package transport

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Session errors.
var (
	// ErrClosed: the session was closed by this node.
	ErrClosed = errors.New("transport: session closed")
	// ErrPingTimeout: the peer did not answer a ping in time: it is gone
	// or the link is cut (a silent partition).
	ErrPingTimeout = errors.New("transport: no answer to a ping within ping-timeout")
	// ErrReplaced: the peer opened a new session, so this one is stale.
	ErrReplaced = errors.New("transport: session replaced by a newer one from the peer")
	// ErrProtocol: the peer sent something this protocol does not allow.
	ErrProtocol = errors.New("transport: protocol violation")
)

// PeerClosedError is the reason the peer gave for closing the session.
type PeerClosedError struct{ Reason string }

func (e *PeerClosedError) Error() string { return "transport: closed by the peer: " + e.Reason }

// Message is an application frame received from the peer.
type Message struct {
	Type    Type
	Payload []byte // owned by the receiver
}

// recvQueueBytes bounds what a stream buffers for the application before
// the reader stops reading the socket (TCP backpressure).
const recvQueueBytes = 16 << 20

// writeChunk is the largest single socket write (2 s at 1 Mbit/s); the write deadline is
// renewed per chunk, so a slow but moving link is not a dead one.
const writeChunk = 256 << 10

// stream is one authenticated connection of a session.
type stream struct {
	kind Stream
	conn net.Conn
	// version is the protocol version agreed for this stream.
	version uint16
	in      frameReader
	q       queue

	// Sending combines: a sender seals its frames into pending (under emu,
	// which orders the sealer's counter), then the first sender to get
	// wmu writes everything pending with one write, its own frames and
	// those of the senders that queued meanwhile.
	emu     sync.Mutex // guards out, pending, spare, filling, written
	out     *frameSealer
	pending outBatch    // sealed frames of batch filling, not yet written
	spare   outBatch    // a written batch's buffers, for reuse
	filling uint64      // the batch that pending holds
	written uint64      // every batch up to this one is written
	wmu     sync.Mutex  // held while a batch is written to the socket
	pieces  net.Buffers // the writer's scratch (under wmu)
}

func newStream(kind Stream, conn net.Conn, r *bufio.Reader, k streamKeys, t *Transport) (*stream, error) {
	out, err := newSealer(k.send, k.sendTag, k.version)
	if err != nil {
		return nil, err
	}
	in, err := newSealer(k.recv, k.recvTag, k.version)
	if err != nil {
		return nil, err
	}
	s := &stream{kind: kind, conn: conn, out: out, filling: 1, version: k.version}
	s.in = frameReader{r: r, s: in, c: t.codecs, known: t.known, pool: &t.bufs, lowat: rcvLowat(conn)}
	s.q.init(recvQueueBytes)
	return s, nil
}

// Session is an established, authenticated pair of connections to the
// peer: a Data stream for bulk traffic and a Control stream for acks and
// pings, so small messages never wait behind megabytes of data. Send and
// Recv are safe for concurrent use; frames of one stream arrive in the
// order they were sent.
type Session struct {
	t        *Transport
	id       [sessionIDSize]byte
	peer     string
	remote   string
	peerInst uint64
	dialed   bool // this node dialed it
	since    time.Time
	streams  [2]*stream

	done    chan struct{}
	once    sync.Once
	mu      sync.Mutex
	err     error
	wg      sync.WaitGroup
	pong    chan uint64   // pongs received
	pingIn  chan uint64   // pings received, to answer
	sent    chan struct{} // application data was sent: ping soon
	pingSeq uint64
	// quietUntil (Unix ns) is when sending next prompts the pinger: no
	// sooner than trafficPingGap after its last ping, never while it
	// awaits a pong. Senders check it instead of waking the pinger for
	// every write.
	quietUntil atomic.Int64
}

// Peer returns the peer's node name.
func (s *Session) Peer() string { return s.peer }

// RemoteAddr returns the peer's address.
func (s *Session) RemoteAddr() string { return s.remote }

// Dialed reports whether this node opened the session.
func (s *Session) Dialed() bool { return s.dialed }

// Done is closed when the session ends.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns why the session ended, or nil while it is up.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *Session) stream(st Stream) *stream { return s.streams[st-1] }

// Version returns the protocol version of the session's data stream (the
// control stream agrees it the same way).
func (s *Session) Version() uint16 { return s.streams[0].version }

// goFunc runs f in a goroutine that both the session and its transport
// wait for.
func (s *Session) goFunc(f func()) {
	s.wg.Add(1)
	s.t.wg.Add(1)
	go func() {
		defer s.t.wg.Done()
		defer s.wg.Done()
		f()
	}()
}

// start runs the readers and the pinger.
func (s *Session) start() {
	for _, st := range s.streams {
		s.goFunc(func() { s.readLoop(st) })
	}
	s.goFunc(s.pinger)
}

// Send sends one application frame on a stream. It returns once the frame
// is handed to the socket; a peer that stops reading for longer than the
// configured timeout fails the session.
func (s *Session) Send(st Stream, typ Type, payload []byte) error {
	if typ < FirstAppType || !s.t.known(typ) {
		return fmt.Errorf("%w %d: register it in Config.Types", ErrFrameType, typ)
	}
	if st != Data && st != Control {
		return fmt.Errorf("transport: no stream %d", st)
	}
	return s.send(st, typ, payload)
}

// Out is a frame for SendMany: its payload is Payload followed by Tail,
// so that a large tail (a write's data) is not copied behind its header
// first.
type Out struct {
	Type          Type
	Payload, Tail []byte
}

// SendMany sends application frames on a stream, in order, with one
// write to the socket: for frames that are ready together (a barrier and
// the write after it, a batch of acks). Like Send, it returns once all are
// handed to the socket; if one cannot be encoded, none is sent.
func (s *Session) SendMany(st Stream, msgs []Out) error {
	return waitSent(s.Queue(st, msgs))
}

// waitSent waits for frames a queue call put on a stream, or returns its
// error.
func waitSent(wait func() error, err error) error {
	if err != nil {
		return err
	}
	return wait()
}

// Queue is SendMany in two steps: it puts the frames on the stream, in
// order behind every frame queued before, and returns a function that
// waits until they are handed to the socket. Payloads are copied, and so
// are tails, except a Tail of 64 KiB or more on a link without encryption
// or compression: the socket write takes that from where it is (writev),
// so the caller keeps it unchanged until wait returns. A caller that orders its frames under a
// lock of its own can so wait outside it, and the frames of several such
// callers go out with one write.
func (s *Session) Queue(st Stream, msgs []Out) (wait func() error, err error) {
	for _, m := range msgs {
		if m.Type < FirstAppType || !s.t.known(m.Type) {
			return nil, fmt.Errorf("%w %d: register it in Config.Types", ErrFrameType, m.Type)
		}
		if n := len(m.Payload) + len(m.Tail); n > MaxPayload {
			return nil, fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, n)
		}
	}
	if st != Data && st != Control {
		return nil, fmt.Errorf("transport: no stream %d", st)
	}
	return s.queueFrames(st, msgs)
}

func (s *Session) send(st Stream, typ Type, payload []byte) error {
	return waitSent(s.queueFrames(st, []Out{{Type: typ, Payload: payload}}))
}

// queueFrames seals msgs onto the stream, behind every frame queued
// before, and returns a function that waits until they are written.
func (s *Session) queueFrames(st Stream, msgs []Out) (func() error, error) {
	select {
	case <-s.done:
		return nil, s.Err()
	default:
	}
	str := s.stream(st)
	var payload uint64
	app := false
	str.emu.Lock()
	before := str.pending.mark()
	for _, m := range msgs {
		// Only a payload above MaxPayload fails, before its frame takes a
		// nonce (SendMany checks every payload first).
		if err := str.pending.appendFrame(str.out, s.t.codecs, s.t.comp, m.Type, m.Payload, m.Tail); err != nil {
			str.pending.rollback(before)
			str.emu.Unlock()
			return nil, err
		}
		payload += uint64(len(m.Payload) + len(m.Tail))
		app = app || m.Type >= FirstAppType
	}
	batch := str.filling
	str.emu.Unlock()
	s.t.stats.framesSent.Add(uint64(len(msgs)))
	s.t.stats.payloadSent.Add(payload)
	return func() error {
		if err := s.writeBatch(str, batch); err != nil {
			return err
		}
		if app && time.Now().UnixNano() >= s.quietUntil.Load() {
			select {
			case s.sent <- struct{}{}:
			default:
			}
		}
		return nil
	}, nil
}

// batchYields bounds how often a sender about to write a batch first
// yields the processor, for as long as each yield let more frames join it.
// The goroutines that are ready to run (the other handlers of a burst of
// NBD requests, the writers one ack message released) then seal their
// frames into the batch and wait behind wmu, and one system call carries
// them all instead of one each: every socket write crosses the whole TCP
// path, and on veth the receiver's too. A sender alone finds nothing added
// after one yield.
const batchYields = 8

// writeBatch returns once batch is written: by this call, with everything
// queued up to now, or by another sender's.
func (s *Session) writeBatch(str *stream, batch uint64) error {
	str.wmu.Lock()
	defer str.wmu.Unlock()
	str.emu.Lock()
	if str.written >= batch {
		str.emu.Unlock()
		return s.sendErr()
	}
	for range batchYields {
		n := str.pending.mark()
		str.emu.Unlock()
		runtime.Gosched()
		str.emu.Lock()
		if str.pending.mark() == n {
			break
		}
	}
	// batch is the one filling: nothing after the last written one.
	b := str.pending
	str.pending, str.spare = str.spare, outBatch{}
	str.filling++
	str.emu.Unlock()
	err := s.write(str, &b)
	size := b.size()
	b.reset()
	str.emu.Lock()
	str.written = batch
	if cap(b.b) <= 4<<20 {
		str.spare = b // keep the buffers, unless huge frames grew them
	}
	str.emu.Unlock()
	s.t.stats.wireSent.Add(uint64(size))
	s.t.stats.writes.Add(1)
	if err != nil {
		// Before wmu goes: the senders whose frames were in b see it.
		s.fail(fmt.Errorf("send on the %s stream: %w", str.kind, err))
		return s.Err()
	}
	return nil
}

// sendErr is what a sender whose frames another wrote returns: nil,
// unless the session has ended meanwhile (perhaps by that write failing).
func (s *Session) sendErr() error {
	select {
	case <-s.done:
		return s.Err()
	default:
		return nil
	}
}

// write writes a batch in chunks, each with a fresh deadline; call with
// str.wmu held.
func (s *Session) write(str *stream, b *outBatch) error {
	return b.writeTo(str.conn, writeChunk, func() time.Time { return time.Now().Add(s.t.cfg.Timeout) }, &str.pieces)
}

// Recv returns the next application frame of a stream. It fails once the
// session ended and everything received before was returned.
func (s *Session) Recv(st Stream) (Message, error) {
	if st != Data && st != Control {
		return Message{}, fmt.Errorf("transport: no stream %d", st)
	}
	m, ok := s.stream(st).q.pop()
	if !ok {
		return Message{}, s.Err()
	}
	return m, nil
}

// Recycle hands back the payload of a message Recv returned, once the
// receiver is done with it: a later frame may be read or copied into it. The
// caller must not use p, or anything sliced from it, afterwards.
func (s *Session) Recycle(p []byte) { s.t.bufs.put(p) }

func (s *Session) readLoop(str *stream) {
	for {
		typ, p, err := str.in.readFrame()
		if err != nil {
			if frameFault(err) {
				err = fmt.Errorf("%w: %w", ErrProtocol, err)
			}
			s.fail(fmt.Errorf("receive on the %s stream: %w", str.kind, err))
			return
		}
		s.t.stats.framesRecv.Add(1)
		s.t.stats.payloadRecv.Add(uint64(len(p)))
		s.t.stats.wireRecv.Add(uint64(str.in.wire))
		switch {
		case typ == typePing && str.kind == Control && len(p) == 8:
			// The pinger answers: a reader never writes.
			select {
			case s.pingIn <- binary.BigEndian.Uint64(p):
			default: // an answer is already due; the peer waits for one
			}
		case typ == typePong && str.kind == Control && len(p) == 8:
			select {
			case s.pong <- binary.BigEndian.Uint64(p):
			default:
			}
		case typ == typeClose:
			s.fail(&PeerClosedError{Reason: string(p[:min(len(p), maxReasonLen)])})
			return
		case typ < FirstAppType:
			s.fail(fmt.Errorf("%w: frame type %d on the %s stream", ErrProtocol, typ, str.kind))
			return
		default:
			if !str.in.owned { // below 1 KiB: in the reader's buffer
				p = append([]byte(nil), p...)
			}
			if !str.q.push(Message{Type: typ, Payload: p}) {
				return
			}
		}
	}
}

// trafficPingGap is the least time between two pings while the
// application sends: data written into a silently cut link sits in socket
// buffers without an error, so traffic makes the pinger check the link
// about once a second rather than once per ping interval.
const trafficPingGap = time.Second

// pinger sends a ping every ping interval, and at most every
// trafficPingGap while application frames are being sent; it fails the
// session when a ping is not answered within the ping timeout, and answers
// the peer's pings. It is the only goroutine that writes pings and pongs:
// a reader never writes, so two nodes busy writing to each other cannot
// deadlock.
func (s *Session) pinger() {
	tick := time.NewTicker(s.t.cfg.PingInterval)
	defer tick.Stop()
	timeout := time.NewTimer(time.Hour)
	timeout.Stop()
	awaiting := false
	var last time.Time // when the last ping was sent
	ping := func() bool {
		s.pingSeq++
		if s.send(Control, typePing, binary.BigEndian.AppendUint64(nil, s.pingSeq)) != nil {
			return false
		}
		awaiting, last = true, time.Now()
		s.quietUntil.Store(math.MaxInt64)
		timeout.Reset(s.t.cfg.PingTimeout)
		return true
	}
	for {
		select {
		case <-s.done:
			return
		case seq := <-s.pingIn:
			if s.send(Control, typePong, binary.BigEndian.AppendUint64(nil, seq)) != nil {
				return
			}
		case seq := <-s.pong:
			if awaiting && seq == s.pingSeq {
				awaiting = false
				s.quietUntil.Store(last.Add(trafficPingGap).UnixNano())
				timeout.Stop()
			}
		case <-tick.C:
			if !awaiting && !ping() {
				return
			}
		case <-s.sent:
			if !awaiting && time.Since(last) >= trafficPingGap && !ping() {
				return
			}
		case <-timeout.C:
			if awaiting {
				s.fail(fmt.Errorf("%w (%v)", ErrPingTimeout, s.t.cfg.PingTimeout))
				return
			}
		}
	}
}

// fail ends the session once, with its first error.
func (s *Session) fail(err error) {
	s.once.Do(func() {
		s.mu.Lock()
		s.err = err
		s.mu.Unlock()
		close(s.done)
		for _, st := range s.streams {
			st.conn.Close()
			st.q.close()
		}
		s.t.ended(s, err)
	})
}

// closeWait is how long Close waits for a stream's writer before it skips
// that stream's close frame: a writer holds wmu for its yields and one
// write, far less unless the write is stuck on a full socket (a peer that
// stopped reading, a dead link: the reason would not get through).
const closeWait = 100 * time.Millisecond

// lockSoon locks mu unless that takes longer than wait. It waits in mu's
// queue of lockers: polling with TryLock could lose to busy senders for
// ever (TryLock fails while the mutex hands itself from waiter to waiter,
// in its starvation mode). Given up, the lock is released as soon as it
// comes: a goroutine waits for it until then, which the session's end
// bounds (it closes the connection a stuck writer writes to).
func lockSoon(mu *sync.Mutex, wait time.Duration) bool {
	got := make(chan struct{})
	go func() {
		mu.Lock()
		close(got)
	}()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-got:
		return true
	case <-t.C:
		go func() {
			<-got
			mu.Unlock()
		}()
		return false
	}
}

// Close ends the session, telling the peer why, and waits for its
// goroutines.
func (s *Session) Close(reason string) error {
	select {
	case <-s.done:
	default:
		// On both streams, so that whichever the peer reads first tells
		// it why; a stream whose write is stuck is skipped.
		for _, st := range s.streams {
			if lockSoon(&st.wmu, closeWait) {
				// Behind the frames queued so far, which go out with it
				// (the peer would refuse a frame out of sealing order).
				st.emu.Lock()
				b := st.pending
				st.pending = outBatch{}
				err := b.appendFrame(st.out, s.t.codecs, CompressNone, typeClose, []byte(reason), nil)
				st.emu.Unlock()
				if err == nil {
					end := time.Now().Add(time.Second)
					b.writeTo(st.conn, writeChunk, func() time.Time { return end }, &st.pieces)
				}
				b.reset()
				st.wmu.Unlock()
			}
		}
		s.fail(ErrClosed)
	}
	s.wg.Wait()
	return nil
}

// queue is a FIFO of received messages bounded in bytes (at least one
// message always fits).
type queue struct {
	mu     sync.Mutex
	cond   sync.Cond
	msgs   []Message
	bytes  int
	max    int
	closed bool
}

func (q *queue) init(max int) {
	q.max = max
	q.cond.L = &q.mu
}

// push adds m, waiting while the queue is full; false once closed.
func (q *queue) push(m Message) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	for !q.closed && len(q.msgs) > 0 && q.bytes+len(m.Payload) > q.max {
		q.cond.Wait()
	}
	if q.closed {
		return false
	}
	q.msgs = append(q.msgs, m)
	q.bytes += len(m.Payload)
	q.cond.Broadcast()
	return true
}

// pop returns the oldest message, waiting for one; false once closed and
// empty.
func (q *queue) pop() (Message, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.msgs) == 0 && !q.closed {
		q.cond.Wait()
	}
	if len(q.msgs) == 0 {
		return Message{}, false
	}
	m := q.msgs[0]
	q.msgs[0] = Message{}
	q.msgs = q.msgs[1:]
	q.bytes -= len(m.Payload)
	q.cond.Broadcast()
	return m, true
}

func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// rcvLowat returns a function that sets conn's SO_RCVLOWAT, or nil when
// conn is not a plain socket (TLS, a pipe).
func rcvLowat(conn net.Conn) func(int) {
	sc, ok := conn.(*net.TCPConn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return func(n int) {
		raw.Control(func(fd uintptr) {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT, n)
		})
	}
}
