package replicator

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nbdmirror/nbdmirror/metadisk"
	"github.com/nbdmirror/nbdmirror/replicator/config"
)

// ErrInUse is returned when another process holds a resource's metadata.
var ErrInUse = errors.New("replicator: metadata in use by another process")

// MetaDevice is the opened metadata device of a node's resource, locked
// against use by another process, with the layout its configuration gives.
type MetaDevice struct {
	File   *os.File
	Path   string
	Spec   config.MetaDisk
	Layout metadisk.Layout
	// Capped, if not nil, says why Layout does not cover the whole data
	// disk: the metadata device is too small for it (create-md refuses;
	// a running resource cannot be resized past Layout.DataSize).
	Capped error
}

// OpenMetaDevice opens the metadata device of host as configured and
// computes its layout from the sizes of the data disk and the device. The
// device is locked (flock): exclusively for writers, shared for readers,
// so that an offline verb never runs against metadata a daemon is using.
func OpenMetaDevice(host *config.Host, write bool) (*MetaDevice, error) {
	path := host.Disk
	if !host.MetaDisk.Internal {
		path = host.MetaDisk.Path
	}
	flag, lock := os.O_RDONLY, unix.LOCK_SH
	if write {
		flag, lock = os.O_RDWR, unix.LOCK_EX
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err // *fs.PathError: names the path
	}
	d := &MetaDevice{File: f, Path: path, Spec: host.MetaDisk}
	if err := unix.Flock(int(f.Fd()), lock|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s is locked (is the daemon running with the resource up?)", ErrInUse, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	d.Layout, d.Capped, err = layoutOf(host, f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// layoutOf computes the layout of host's metadata on f from the sizes of
// the data disk and the metadata device now: for external and indexed
// metadata capped at what the device can describe (capped then says so;
// create-md refuses such a layout, a running resource just cannot grow
// past it).
func layoutOf(host *config.Host, f *os.File) (l metadisk.Layout, capped error, err error) {
	mdSize, err := deviceSize(f)
	if err != nil {
		return l, nil, err
	}
	if host.MetaDisk.Internal {
		l, err = metadisk.InternalLayout(mdSize)
		if err != nil {
			return l, nil, fmt.Errorf("%s: %w", host.MetaDisk, err)
		}
		return l, nil, nil
	}
	diskSize, err := pathSize(host.Disk)
	if err != nil {
		return l, nil, err
	}
	if host.MetaDisk.Index >= 0 {
		l, err = metadisk.IndexedCapacity(diskSize, mdSize, host.MetaDisk.Index)
		if err == nil {
			_, capped = metadisk.IndexedLayout(diskSize, mdSize, host.MetaDisk.Index)
		}
	} else {
		l, err = metadisk.ExternalCapacity(diskSize, mdSize)
		if err == nil {
			_, capped = metadisk.ExternalLayout(diskSize, mdSize)
		}
	}
	if err != nil {
		return l, nil, fmt.Errorf("%s: %w", host.MetaDisk, err)
	}
	if capped != nil {
		capped = fmt.Errorf("%s: %w", host.MetaDisk, capped)
	}
	return l, capped, nil
}

// Close unlocks and closes the device.
func (d *MetaDevice) Close() error { return d.File.Close() }

func pathSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return deviceSize(f)
}

// deviceSize returns the size of a regular file or block device.
func deviceSize(f *os.File) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	switch {
	case fi.Mode().IsRegular():
		return fi.Size(), nil
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		return f.Seek(0, io.SeekEnd)
	}
	return 0, fmt.Errorf("%s is neither a regular file nor a block device", f.Name())
}
