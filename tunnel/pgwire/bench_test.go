package pgwire

import (
	"context"
	"io"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/wicketgw/wicket/tunnel"
)

// BenchmarkFollow streams a synthetic result of 8 MiB of DataRows from a
// loopback "server" to a loopback client, through a plain tunnel.Relay and
// through Follow, so the cost of framing can be read as a ratio.
func BenchmarkFollow(b *testing.B) {
	row, _ := (&pgproto3.DataRow{Values: [][]byte{[]byte("1234567"), make([]byte, 90)}}).Encode(nil)
	head, _ := (&pgproto3.AuthenticationOk{}).Encode(nil)
	head, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(head)
	payload := head
	for len(payload) < 8<<20 {
		payload = append(payload, row...)
	}
	payload, _ = (&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")}).Encode(payload)
	payload, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(payload)
	raw, _ := startupMessage().Encode(nil)
	startup := &Startup{Raw: raw, User: "postgres", Database: "postgres"}

	for _, mode := range []string{"relay", "follow"} {
		b.Run(mode, func(b *testing.B) {
			b.SetBytes(int64(len(payload)))
			b.ReportAllocs()
			for b.Loop() {
				client, gwClient := tcpPair(b)
				gwServer, server := tcpPair(b)
				go func() {
					io.ReadFull(server, make([]byte, len(raw)))
					server.Write(payload)
					server.Close()
				}()
				done := make(chan struct{})
				go func() {
					defer close(done)
					if mode == "relay" {
						gwServer.Write(raw)
						tunnel.Relay(context.Background(), gwClient, gwServer)
					} else {
						Follow(context.Background(), gwClient, gwServer, startup, Options{})
					}
				}()
				n, _ := io.Copy(io.Discard, client)
				if n != int64(len(payload)) {
					b.Fatalf("client got %d bytes of %d", n, len(payload))
				}
				client.Close()
				<-done
			}
		})
	}
}
