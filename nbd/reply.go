package nbd

import (
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"time"
)

// reply is one simple reply waiting to be written.
type reply struct {
	cookie uint64
	errno  Errno
	data   *[]byte // READ data; returned to the pool once written
	cost   charge  // in-flight budget to release once written
}

// replyWriter serialises replies onto the connection. There is no writer
// goroutine: a reply is written by the goroutine that produced it, or by
// another one that writes a whole batch in one writev:
//
//   - A goroutine that finds another one writing only queues its reply; the
//     writer keeps writing until the queue is empty.
//   - A handler that finishes while other requests wait to be picked up by a
//     worker only queues its reply: the last of those requests to start writes
//     the queue before it runs (see started), so under a pipelined load many
//     replies share one system call, and no reply waits behind a slow request.
//   - The writer yields the processor before each write for as long as the
//     queue grows (at most batchYields times): handlers that are ready to
//     finish (say, all those a peer's acks released at once) queue theirs
//     first and go out with it. A writer alone finds nothing added after one
//     yield.
//
// A reply's header and data always go out together, and replies never
// interleave. In-flight budget is released only once a reply is written, so
// a client that stops reading replies stops the server reading its requests.
type replyWriter struct {
	c *conn

	mu     sync.Mutex
	queue  []reply
	spare  []reply
	busy   bool
	queued int   // requests dispatched to workers and not yet started
	err    error // first write error; later replies are dropped

	// Owned by the goroutine that is writing.
	hdrs    []byte
	iov     net.Buffers
	renewAt time.Time // when to move the write deadline on
}

// batchYields bounds the yields before a write of replies.
const batchYields = 8

// dispatched records a request handed to the workers.
func (w *replyWriter) dispatched() {
	w.mu.Lock()
	w.queued++
	w.mu.Unlock()
}

// started records that a worker picked a request up; the last one to start
// writes whatever replies wait.
func (w *replyWriter) started() {
	w.mu.Lock()
	w.queued--
	if w.queued > 0 || w.busy || len(w.queue) == 0 {
		w.mu.Unlock()
		return
	}
	w.drain()
}

// send queues r and writes the queue unless another goroutine is writing
// or a dispatched request will write it when it starts.
func (w *replyWriter) send(r reply) {
	w.mu.Lock()
	w.queue = append(w.queue, r)
	if w.busy || w.queued > 0 {
		w.mu.Unlock()
		return
	}
	w.drain()
}

// drain writes the queue until it is empty. It is called with w.mu held and
// returns with it released.
func (w *replyWriter) drain() {
	w.busy = true
	for len(w.queue) > 0 {
		for range batchYields {
			n := len(w.queue)
			w.mu.Unlock()
			runtime.Gosched()
			w.mu.Lock()
			if len(w.queue) == n {
				break
			}
		}
		batch := w.queue
		w.queue = w.spare[:0]
		err := w.err
		w.mu.Unlock()
		if err == nil {
			err = w.write(batch)
		}
		for i := range batch {
			w.c.srv.pool.put(batch[i].data)
			w.c.release(batch[i].cost)
			batch[i] = reply{}
		}
		w.mu.Lock()
		if err != nil && w.err == nil {
			w.err = err
			w.c.nc.Close() // the reader sees the connection end
		}
		w.spare = batch[:0]
	}
	w.busy = false
	w.mu.Unlock()
}

// write sends a batch of replies with one writev: consecutive headers are
// packed into one buffer, read data goes out from its own buffer.
func (w *replyWriter) write(batch []reply) error {
	if need := len(batch) * replySize; cap(w.hdrs) < need {
		w.hdrs = make([]byte, 0, need)
	}
	hdrs := w.hdrs[:0]
	iov := w.iov[:0]
	start := 0
	for i := range batch {
		var h [replySize]byte
		putReply(&h, batch[i].errno, batch[i].cookie)
		hdrs = append(hdrs, h[:]...)
		if batch[i].data != nil {
			iov = append(iov, hdrs[start:], *batch[i].data)
			start = len(hdrs)
		}
	}
	if start < len(hdrs) {
		iov = append(iov, hdrs[start:])
	}
	w.iov = iov[:0]
	w.c.srv.replyWrites.Add(1)
	bufs := iov
	var err error
	for len(bufs) > 0 {
		w.renewDeadline()
		var n int64
		if len(bufs) == 1 {
			var m int
			m, err = w.c.nc.Write(bufs[0])
			n, bufs[0] = int64(m), bufs[0][m:]
			if err == nil {
				break
			}
		} else {
			n, err = bufs.WriteTo(w.c.nc) // consumes what it wrote
		}
		if err == nil || n == 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		// A slow reader, not a stalled one: go on with a new deadline.
		w.renewAt = time.Time{}
	}
	clear(iov[:cap(iov)]) // drop references to pooled buffers
	return err
}

// renewDeadline keeps the connection's write deadline ReplyTimeout ahead,
// renewing it once half of it has passed (not at every write: the
// deadline then falls between half of ReplyTimeout and all of it after
// the last progress).
func (w *replyWriter) renewDeadline() {
	now := time.Now()
	if now.Before(w.renewAt) {
		return
	}
	t := w.c.srv.ReplyTimeout
	w.renewAt = now.Add(t / 2)
	w.c.nc.SetWriteDeadline(now.Add(t))
}

// failed returns the first error writing replies, if any.
func (w *replyWriter) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}
