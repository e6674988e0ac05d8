package metrics

import (
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nbdmirror/nbdmirror/replicator"
)

// Metrics is one daemon's metrics.
type Metrics struct {
	reg      *prometheus.Registry
	inFlight *prometheus.GaugeVec
	duration *prometheus.HistogramVec
	failed   *prometheus.CounterVec
	// ops caches the series of each export and command ([2]string →
	// *opSeries): a request then costs no label hashing.
	ops sync.Map
}

// opSeries are the NBD series of one export and command.
type opSeries struct {
	inFlight prometheus.Gauge
	duration prometheus.Observer
	failed   prometheus.Counter
}

func (m *Metrics) op(export, op string) *opSeries {
	key := [2]string{export, op}
	if s, ok := m.ops.Load(key); ok {
		return s.(*opSeries)
	}
	s, _ := m.ops.LoadOrStore(key, &opSeries{inFlight: m.inFlight.WithLabelValues(export, op),
		duration: m.duration.WithLabelValues(export, op), failed: m.failed.WithLabelValues(export, op)})
	return s.(*opSeries)
}

// New returns the metrics of a daemon of version whose resources'
// snapshots snapshots returns (called at every scrape).
func New(version string, snapshots func() []replicator.Snapshot) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "nbdmirror_nbd_requests_in_flight",
			Help: "NBD requests read and not yet answered, by resource (export) and command.",
		}, []string{"resource", "op"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "nbdmirror_nbd_request_duration_seconds",
			Help: "Time from reading an NBD request to queueing its reply, by resource (export) and command.",
			// 25 µs to about 3.3 s, doubling.
			Buckets: prometheus.ExponentialBuckets(25e-6, 2, 18),
		}, []string{"resource", "op"}),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nbdmirror_nbd_request_errors_total",
			Help: "NBD requests answered with an error, by resource (export) and command.",
		}, []string{"resource", "op"}),
	}
	m.reg.MustRegister(m.inFlight, m.duration, m.failed,
		&resources{version: version, snapshots: snapshots},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the metrics in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// RequestStarted counts an NBD request in flight (nbd.Observer).
func (m *Metrics) RequestStarted(export, op string) {
	m.op(export, op).inFlight.Inc()
}

// RequestDone records an NBD request's latency (nbd.Observer).
func (m *Metrics) RequestDone(export, op string, took time.Duration, failed bool) {
	s := m.op(export, op)
	s.inFlight.Dec()
	s.duration.Observe(took.Seconds())
	if failed {
		s.failed.Inc()
	}
}

// resources is the collector of the resources' state, read from their
// snapshots at every scrape.
type resources struct {
	version   string
	snapshots func() []replicator.Snapshot
}

var (
	buildInfo = prometheus.NewDesc("nbdmirror_build_info",
		"The daemon's version and Go version (value 1).", []string{"version", "goversion"}, nil)
	resourcesDesc = prometheus.NewDesc("nbdmirror_resources",
		"Resources configured for this node.", nil, nil)
	role = prometheus.NewDesc("nbdmirror_resource_role",
		"The resource's role here: 1 for the current one.", []string{"resource", "role"}, nil)
	diskState = prometheus.NewDesc("nbdmirror_device_disk_state",
		"The local disk's state: 1 for the current one.", []string{"resource", "state"}, nil)
	size = prometheus.NewDesc("nbdmirror_device_size_bytes",
		"The resource's usable size.", []string{"resource"}, nil)
	written = prometheus.NewDesc("nbdmirror_device_written_bytes_total",
		"Bytes written to the local disk (application and replicated writes, resync data).", []string{"resource"}, nil)
	read = prometheus.NewDesc("nbdmirror_device_read_bytes_total",
		"Bytes read from the local disk.", []string{"resource"}, nil)
	alWrites = prometheus.NewDesc("nbdmirror_device_al_writes_total",
		"Activity-log transactions written.", []string{"resource"}, nil)
	bmWrites = prometheus.NewDesc("nbdmirror_device_bm_writes_total",
		"Bitmap pages written.", []string{"resource"}, nil)
	lowerPending = prometheus.NewDesc("nbdmirror_device_lower_pending",
		"Requests in flight on the local disk.", []string{"resource"}, nil)
	upperPending = prometheus.NewDesc("nbdmirror_device_upper_pending",
		"Application requests in flight in the resource.", []string{"resource"}, nil)
	connState = prometheus.NewDesc("nbdmirror_connection_state",
		"The connection's state: 1 for the current one.", []string{"resource", "peer", "state"}, nil)
	peerRole = prometheus.NewDesc("nbdmirror_peer_role",
		"The peer's role as last known: 1 for the current one.", []string{"resource", "peer", "role"}, nil)
	peerDisk = prometheus.NewDesc("nbdmirror_peer_disk_state",
		"The peer's disk state as last known: 1 for the current one.", []string{"resource", "peer", "state"}, nil)
	outOfSync = prometheus.NewDesc("nbdmirror_peer_out_of_sync_bytes",
		"Data marked out of sync with the peer in this node's bitmap.", []string{"resource", "peer"}, nil)
	sent = prometheus.NewDesc("nbdmirror_peer_sent_bytes_total",
		"Bytes of peer-protocol messages sent to the peer.", []string{"resource", "peer"}, nil)
	received = prometheus.NewDesc("nbdmirror_peer_received_bytes_total",
		"Bytes of peer-protocol messages received from the peer.", []string{"resource", "peer"}, nil)
	resyncBytes = prometheus.NewDesc("nbdmirror_peer_resync_bytes_total",
		"Resync data written here as SyncTarget or sent as SyncSource.", []string{"resource", "peer"}, nil)
	resyncLeft = prometheus.NewDesc("nbdmirror_peer_resync_left_bytes",
		"What the running resync or verify still has to do (0 when none runs).", []string{"resource", "peer"}, nil)
	resyncRate = prometheus.NewDesc("nbdmirror_peer_resync_rate_bytes_per_second",
		"The running resync's or verify's speed over the last seconds (0 when none runs).", []string{"resource", "peer"}, nil)
	pending = prometheus.NewDesc("nbdmirror_peer_replication_pending_bytes",
		"Replicated writes sent to the peer and not yet on its stable storage (barrier-acked).", []string{"resource", "peer"}, nil)
	lag = prometheus.NewDesc("nbdmirror_peer_replication_lag_seconds",
		"Age of the oldest write not yet on the peer's stable storage (0 when none): what a failover now would lose under protocol A.", []string{"resource", "peer"}, nil)
	authFailures = prometheus.NewDesc("nbdmirror_peer_auth_failures_total",
		"Peer connections refused for failed authentication (secret, certificate, node name).", []string{"resource", "peer"}, nil)
	handlerRuns = prometheus.NewDesc("nbdmirror_handler_runs_total",
		"Handler runs by handler and exit code (-1: killed at handler-timeout, or not started).",
		[]string{"resource", "handler", "exit_code"}, nil)
)

func (c *resources) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{buildInfo, resourcesDesc, role, diskState, size, written, read, alWrites,
		bmWrites, lowerPending, upperPending, connState, peerRole, peerDisk, outOfSync, sent, received,
		resyncBytes, resyncLeft, resyncRate, pending, lag, authFailures, handlerRuns} {
		ch <- d
	}
}

func (c *resources) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(buildInfo, 1, c.version, runtime.Version())
	snaps := c.snapshots()
	gauge(resourcesDesc, float64(len(snaps)))
	for _, s := range snaps {
		res := s.Name
		for _, r := range replicator.Roles() {
			gauge(role, one(r == s.Role), res, r.String())
		}
		for _, d := range replicator.DiskStates() {
			gauge(diskState, one(d == s.Disk), res, d.String())
		}
		gauge(size, float64(s.SizeBytes), res)
		counter(written, s.WrittenBytes, res)
		counter(read, s.ReadBytes, res)
		counter(alWrites, s.Counters.AL, res)
		counter(bmWrites, s.Counters.BM, res)
		gauge(lowerPending, float64(s.Counters.LO), res)
		gauge(upperPending, float64(s.Counters.AP), res)
		for _, h := range s.HandlerRuns {
			counter(handlerRuns, h.Runs, res, h.Handler, strconv.Itoa(h.Status))
		}
		if s.Peer == "" {
			continue // no peer configured: no connection series
		}
		peer := s.Peer
		for _, cs := range replicator.ConnStates() {
			gauge(connState, one(cs == s.Conn), res, peer, cs.String())
		}
		for _, r := range replicator.Roles() {
			gauge(peerRole, one(r == s.PeerRole), res, peer, r.String())
		}
		for _, d := range replicator.DiskStates() {
			gauge(peerDisk, one(d == s.PeerDisk), res, peer, d.String())
		}
		gauge(outOfSync, float64(s.OutOfSyncBytes), res, peer)
		counter(sent, s.SentBytes, res, peer)
		counter(received, s.ReceivedBytes, res, peer)
		counter(resyncBytes, s.ResyncBytes, res, peer)
		var left, rate float64
		if s.Resync != nil {
			left, rate = float64(s.Resync.LeftBytes), float64(s.Resync.SpeedRecent)
		}
		gauge(resyncLeft, left, res, peer)
		gauge(resyncRate, rate, res, peer)
		gauge(pending, float64(s.PendingBytes), res, peer)
		gauge(lag, s.Lag.Seconds(), res, peer)
		counter(authFailures, s.AuthFailures, res, peer)
	}
}

func one(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
