package main

import (
	"encoding/xml"
	"fmt"
	"io"
)

// The meta-data of ocf:nbdmirror:nbdmirror, in the OCF resource agent API
// 1.0 (resource-agents' ra-api-1.dtd, which ocf-tester validates against).

type raMeta struct {
	XMLName    xml.Name   `xml:"resource-agent"`
	Name       string     `xml:"name,attr"`
	Version    string     `xml:"version,attr"`
	APIVersion string     `xml:"version"`
	LongDesc   raDesc     `xml:"longdesc"`
	ShortDesc  raDesc     `xml:"shortdesc"`
	Parameters []raParam  `xml:"parameters>parameter"`
	Actions    []raAction `xml:"actions>action"`
}

type raDesc struct {
	Lang string `xml:"lang,attr"`
	Text string `xml:",chardata"`
}

type raParam struct {
	Name      string    `xml:"name,attr"`
	Required  int       `xml:"required,attr"`
	Unique    int       `xml:"unique,attr"`
	LongDesc  raDesc    `xml:"longdesc"`
	ShortDesc raDesc    `xml:"shortdesc"`
	Content   raContent `xml:"content"`
}

type raContent struct {
	Type    string `xml:"type,attr"`
	Default string `xml:"default,attr,omitempty"`
}

type raAction struct {
	Name     string `xml:"name,attr"`
	Timeout  string `xml:"timeout,attr"`
	Interval string `xml:"interval,attr,omitempty"`
	Role     string `xml:"role,attr,omitempty"`
	Depth    string `xml:"depth,attr,omitempty"`
}

// ocfActionTimeout is the timeout the meta-data advertises for an action
// (drbd.ocf's), in seconds; an action run without
// OCF_RESKEY_CRM_meta_timeout keeps to it.
func ocfActionTimeout(action string) int {
	switch action {
	case "start":
		return 240
	case "stop":
		return 100
	case "promote", "demote", "notify":
		return 90
	case "validate-all":
		return 30
	case "meta-data":
		return 5
	}
	return 20 // monitor
}

func ocfMetaData() raMeta {
	en := func(s string) raDesc { return raDesc{Lang: "en", Text: s} }
	param := func(name string, required, unique int, typ, def, short, long string) raParam {
		return raParam{Name: name, Required: required, Unique: unique, ShortDesc: en(short), LongDesc: en(long),
			Content: raContent{Type: typ, Default: def}}
	}
	timeout := func(action string) string { return fmt.Sprintf("%ds", ocfActionTimeout(action)) }
	return raMeta{
		Name: "nbdmirror", Version: version(), APIVersion: "1.0",
		ShortDesc: en("Manages an nbdmirror resource as a promotable clone"),
		LongDesc: en("Manages one nbdmirror resource (DRBD-style block replication in user space between two nodes) " +
			"as a promotable clone: started is Secondary, promoted is Primary, whose NBD export (and kernel device, " +
			"if configured) the file system or application on top uses. The node daemon, nbdmirror.service, must " +
			"run on every node; the agent brings the resource up and down through its control socket. " +
			"Promotion scores follow the data: only a node with UpToDate data gets a high score. Configure the clone " +
			"with clone-max=2 clone-node-max=1 promoted-max=1 promoted-node-max=1 notify=true."),
		Parameters: []raParam{
			param("resource", 1, 1, "string", "", "nbdmirror resource name",
				"The name of the resource in the nbdmirror configuration (resource NAME { ... })."),
			param("config", 0, 0, "string", ocfDefaultConfig, "nbdmirror configuration file",
				"The configuration file the node daemon was started with (its --config)."),
			param("node", 0, 0, "string", "", "this node's name in the configuration",
				"This node's name in the configuration (its 'on NAME' section, the daemon's --node). Default: the host name."),
			param("run_dir", 0, 0, "string", ocfDefaultRunDir, "the daemon's run directory",
				"The node daemon's --run-dir, where its control socket control.sock is."),
			param("wfc_timeout", 0, 0, "integer", ocfDefaultWFC, "seconds start waits for the peer",
				"How long start waits for the connection to the peer before it returns anyway (the peer may be down)."),
			param("adjust_master_score", 0, 0, "string", ocfDefaultScores, "promotion scores",
				"Four numbers: the promotion score of a node whose disk is only Consistent (after both nodes crashed; "+
					"0 removes the score, so such a node is not promoted by itself); of a node whose disk is not "+
					"UpToDate while the connected peer's is; of an UpToDate node whose peer is unknown; and of an "+
					"UpToDate node that is Primary or knows its peer's disk state."),
			param("ignore_missing_notifications", 0, 0, "boolean", "false", "allow a clone without notify=true",
				"The agent refuses a clone without notify=true: the peer's start notification is when a node that "+
					"came back reconnects. Set this to true to run without notifications anyway."),
		},
		Actions: []raAction{
			{Name: "start", Timeout: timeout("start")},
			{Name: "promote", Timeout: timeout("promote")},
			{Name: "demote", Timeout: timeout("demote")},
			{Name: "notify", Timeout: timeout("notify")},
			{Name: "stop", Timeout: timeout("stop")},
			{Name: "monitor", Timeout: timeout("monitor"), Interval: "20s", Role: "Slave"},
			{Name: "monitor", Timeout: timeout("monitor"), Interval: "10s", Role: "Master"},
			{Name: "meta-data", Timeout: timeout("meta-data")},
			{Name: "validate-all", Timeout: timeout("validate-all")},
		},
	}
}

// writeOCFMetaData prints the meta-data with the DOCTYPE line that
// xmllint --valid (ocf-tester) needs.
func writeOCFMetaData(w io.Writer) error {
	b, err := xml.MarshalIndent(ocfMetaData(), "", "  ")
	if err != nil {
		return fmt.Errorf("meta-data: %w", err)
	}
	_, err = fmt.Fprintf(w, "%s<!DOCTYPE resource-agent SYSTEM \"ra-api-1.dtd\">\n%s\n", xml.Header, b)
	return err
}
